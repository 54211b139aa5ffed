"""The benchmark's samples: the cc12m-32 captions whose images are exactly 512 x 512 (smart_resize keeps that
size, a multiple of 32 inside the default pixel budget, so every image is 32 x 32 patches, 256 LLM tokens), with
absolute image paths, written COPIES times (jobs/bench/run.sh packs 1 copy, scaling.sh 4: one per rank).

Usage: python3 select_512px.py CAPTIONS.jsonl OUT.jsonl [COPIES]
"""
import json
import os
import sys

SQUARE = {"000000003.jpg", "000000007.jpg", "000000019.jpg", "000000025.jpg", "000000027.jpg", "000000033.jpg",
          "000000038.jpg"}

src, dst = sys.argv[1], sys.argv[2]
copies = int(sys.argv[3]) if len(sys.argv) > 3 else 1
folder = os.path.dirname(os.path.abspath(src))
samples = []
with open(src) as f:
    for line in f:
        sample = json.loads(line)
        if sample["images"][0] in SQUARE:
            sample["images"] = [os.path.join(folder, name) for name in sample["images"]]
            samples.append(sample)
with open(dst, "w") as out:
    for _ in range(copies):
        for sample in samples:
            out.write(json.dumps(sample) + "\n")
