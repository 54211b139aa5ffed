"""Times Hugging Face transformers' training step in PyTorch on the batch and model of jobs/bench/run.sh, and
prints its tokens/s and the ratio q3vl / HF (from build/bench/q3vl_summary.json, written by run.sh).

Model: jobs/flavors/bench-moe.json as Qwen3VLMoeForConditionalGeneration in float32 with HF's own init, with
the attention and experts implementations HF picks by default (sdpa; grouped_mm where torch can dispatch it,
else eager), or those given by --attn / --experts.

Batch: the one packed sequence of the q3vl shard (build/bench/packed; run.sh checks that the pack holds only
it, so it is the batch of every q3vl step), rebuilt with h5py as io/shard_format.md documents: input_ids and
labels (HF shifts labels inside its loss; a document's first label is -100, so the shift never reaches across
documents), pixel_values normalised and patchified exactly as io/patchify.h says
for images, image_grid_thw, and position_ids [4, 1, L]: row 0 counts from 0 in each document, which makes
transformers build a block-diagonal causal mask for the packed documents (masking_utils'
find_packed_sequence_indices; only without a cache, hence use_cache=False), rows 1-3 are HF's get_rope_index
run on each document alone.

Step: forward with labels and the router aux loss + backward + global-norm clipping at 1.0 + torch AdamW
(lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 except norms, biases and embeddings), as bench-moe.yaml
configures q3vl; torch.set_num_threads(2). The first --warmup steps are not timed; the median of --steps is, and
the fastest of them (the least disturbed on a shared machine).

Usage (the venv of tests/golden/generate.sh, which has torch 2.15.0, transformers 5.24.0 and h5py):
  build/golden-venv/bin/python jobs/bench/hf_train_step.py [--steps 6] [--warmup 2] [--attn sdpa|eager]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import transformers
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
PATCH, TEMPORAL_PATCH, MERGE = 16, 2, 2


def patchify_image(pixels):
    """uint8 [H, W, 3] -> (pixel_values [patches, 1536], grid (1, H/16, W/16)) as io/patchify.h documents for
    images: x * (1/255) in double rounded to float, then (x - 0.5) / 0.5 in float; the frame repeated to
    T = 2; rows ordered (t, block_row, block_col, row_in_block, col_in_block), features (channel, frame, y, x)."""
    height, width, channels = pixels.shape
    scaled = (pixels.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    normalised = (scaled - np.float32(0.5)) / np.float32(0.5)
    frames = np.repeat(normalised.transpose(2, 0, 1)[None], TEMPORAL_PATCH, axis=0)  # [T, C, H, W]
    grid_h, grid_w = height // PATCH, width // PATCH
    x = frames.reshape(1, TEMPORAL_PATCH, channels, grid_h // MERGE, MERGE, PATCH, grid_w // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(grid_h * grid_w, channels * TEMPORAL_PATCH * PATCH * PATCH), (1, grid_h, grid_w)


def read_packed_sequence(shard_path, sequence):
    """One packed sequence of a q3vl shard: token ids, labels, per-document token ranges, per-document image
    grids, and the normalised patches of its images in order."""
    with h5py.File(shard_path, "r") as f:
        seq_docs = f["sequence_documents"][:]
        doc_tokens = f["document_tokens"][:]
        doc_items = f["document_items"][:]
        first_doc, end_doc = int(seq_docs[sequence]), int(seq_docs[sequence + 1])
        begin, end = int(doc_tokens[first_doc]), int(doc_tokens[end_doc])
        ids = f["tokens"][begin:end].astype(np.int64)
        labels = f["labels"][begin:end].astype(np.int64)
        item_kind = f["item_kind"][:]
        item_frame_hw = f["item_frame_hw"][:]
        item_pixels = f["item_pixels"][:]
        documents, patches = [], []
        for d in range(first_doc, end_doc):
            grids = []
            for i in range(int(doc_items[d]), int(doc_items[d + 1])):
                if item_kind[i] != 0:
                    sys.exit(f"hf_train_step: item {i} of {shard_path} is a video; this benchmark packs images only")
                frames, height, width = (int(v) for v in item_frame_hw[i])
                raw = f["pixels"][int(item_pixels[i]):int(item_pixels[i + 1])].reshape(frames, height, width, 3)
                values, grid = patchify_image(raw[0])
                patches.append(values)
                grids.append(grid)
            documents.append((int(doc_tokens[d]) - begin, int(doc_tokens[d + 1]) - begin, grids))
    return ids, labels, documents, np.concatenate(patches)


def packed_position_ids(model, ids, documents):
    """[4, 1, L]: row 0 the text positions restarting at 0 per document (the packed-sequence mask), rows 1-3
    HF's multimodal rope index of each document on its own."""
    image_token = model.config.image_token_id
    rows = []
    for begin, end, grids in documents:
        doc_ids = torch.from_numpy(ids[begin:end])[None]
        mrope, _ = model.model.get_rope_index(
            doc_ids, mm_token_type_ids=(doc_ids == image_token).int(),
            image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None)
        rows.append(torch.cat([torch.arange(end - begin)[None, None], mrope], dim=0))
    return torch.cat(rows, dim=2)


def adamw(model):
    """torch AdamW with q3vl's default decay groups: no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packed", default=str(ROOT / "build/bench/packed"), help="q3vl pack output folder")
    parser.add_argument("--flavor", default=str(ROOT / "jobs/flavors/bench-moe.json"))
    parser.add_argument("--q3vl-summary", default=str(ROOT / "build/bench/q3vl_summary.json"))
    parser.add_argument("--out", default=str(ROOT / "build/bench/hf_summary.json"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median and fastest reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--experts", default=None, help="HF experts_implementation (default: HF's choice)")
    parser.add_argument("--init-from", default=None,
                        help="an HF model folder to start from instead of HF's init (the README's equality check)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    manifest = json.loads((Path(args.packed) / "manifest.json").read_text())
    shard = Path(args.packed) / manifest["shards"][0]["file"]
    ids, labels, documents, pixel_values = read_packed_sequence(shard, 0)
    if any(labels[begin] != -100 for begin, _, _ in documents):
        sys.exit("hf_train_step: a document's first label is trained; HF's shift would cross documents")

    kwargs = {"attn_implementation": args.attn, "dtype": torch.float32}
    if args.experts:
        kwargs["experts_implementation"] = args.experts
    if args.init_from:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.init_from, **kwargs)
    else:
        model = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig.from_json_file(args.flavor), **kwargs)
    model.train()
    optimizer = adamw(model)
    inputs = {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "pixel_values": torch.from_numpy(pixel_values),
        "image_grid_thw": torch.tensor([g for _, _, grids in documents for g in grids], dtype=torch.long),
        "position_ids": packed_position_ids(model, ids, documents),
        "output_router_logits": True,
        "use_cache": False,  # a cache would store keys and values, and disables the packed-sequence mask
    }
    tokens = int(ids.shape[0])
    parameters = sum(p.numel() for p in model.parameters())

    times, cpu_times, losses = [], [], []
    for step in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
        print(f"HF step {step + 1}/{args.warmup + args.steps}{' (warm-up)' if step < args.warmup else ''}: "
              f"loss {losses[-1]:.4f}, {seconds:.3f} s, {tokens / seconds:.1f} tokens/s, "
              f"CPU use {cpu_seconds / seconds:.2f} cores", flush=True)

    step_s = statistics.median(times)
    summary = {
        "what": "HF transformers fp32 training step on the CPU: forward with labels + router aux loss, backward, "
                "clip 1.0, torch AdamW",
        "attn_implementation": model.config.text_config._attn_implementation,
        "experts_implementation": model.config.text_config._experts_implementation,
        "parameters": parameters,
        "tokens_per_step": tokens,
        "vision_patches": int(pixel_values.shape[0]),
        "torch_threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_s": step_s,
        "step_s_min": min(times),
        "tokens_per_s": tokens / step_s,
        "cpu_cores_used": statistics.median(c / t for c, t in zip(cpu_times, times)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": losses,
        "load_average": os.getloadavg(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    print(f"HF bench-moe ({summary['attn_implementation']} attention, {summary['experts_implementation']} experts), "
          f"{tokens} tokens/step, median of {args.steps} steps after {args.warmup} warm-up: "
          f"{summary['tokens_per_s']:.1f} tokens/s, step {step_s:.3f} s (fastest {min(times):.3f} s), "
          f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")

    q3vl_path = Path(args.q3vl_summary)
    if q3vl_path.exists():
        q3vl = json.loads(q3vl_path.read_text())
        if q3vl["tokens_per_step"] != tokens or q3vl["parameters"] != parameters:
            sys.exit(f"hf_train_step: {q3vl_path} is for {q3vl['tokens_per_step']} tokens and {q3vl['parameters']} "
                     f"parameters, this run {tokens} and {parameters}; rerun jobs/bench/run.sh")
        # The same batch, so the same FLOPs: q3vl's FLOP model gives HF's GFLOP/s too.
        summary["gflops"] = q3vl["step_flops"] / step_s / 1e9
        summary["ratio_q3vl_over_hf"] = q3vl["tokens_per_s"] / summary["tokens_per_s"]
        summary["ratio_q3vl_over_hf_fastest_steps"] = summary["step_s_min"] / q3vl["step_s_min"]
        print(f"q3vl: {q3vl['tokens_per_s']:.1f} tokens/s, {q3vl['gflops']:.2f} GFLOP/s, step {q3vl['step_s']:.3f} s "
              f"(fastest {q3vl['step_s_min']:.3f} s), peak RSS {q3vl['peak_rss_bytes'] / 2**20:.0f} MiB")
        print(f"HF:   {summary['tokens_per_s']:.1f} tokens/s, {summary['gflops']:.2f} GFLOP/s (q3vl's FLOP count), "
              f"step {step_s:.3f} s (fastest {min(times):.3f} s), peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
        print(f"ratio q3vl / HF tokens/s: {summary['ratio_q3vl_over_hf']:.2f} (medians), "
              f"{summary['ratio_q3vl_over_hf_fastest_steps']:.2f} (fastest steps)")
    else:
        print(f"no {q3vl_path}: run jobs/bench/run.sh first for the ratio")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
