"""Generates reference.json, what tests/io/test_pack_reference.cpp compares `q3vl pack`'s shards against.

For every sample of tests/shared/data/cc12m-32/captions.jsonl, mllm-demo/mllm_demo.json and
mllm-demo/mllm_video_demo.json (chat mode), and of captions.jsonl again in caption mode, reference.json holds the
token ids and labels (run-length encoded as [value, count] pairs), and per vision item its kind, grid_thw, the
index of its first pad token and a 64-bit hash of its resized uint8 RGB pixels ([frames, height, width, 3]; the
positional hash of tests/io/media_reference/generate.py).

How the ids come about: transformers' own Qwen3VLProcessor.apply_chat_template(tokenize=True, return_dict=True,
return_assistant_tokens_mask=True) renders the Jinja template of this folder, expands the vision pads and
tokenizes with the fast tokenizer loaded from tests/shared/assets/qwen3-tokenizer/tokenizer.json. The hub is
unreachable and that folder's tokenizer_config.json holds Qwen3's text template, so the Qwen3-VL Instruct template
is written here from SPEC ("Processor"): qwen3_vl_chat.jinja for chat mode and caption.jinja for caption mode (the
packer's image-then-caption layout). Samples in the messages format become HF content parts: each <image> or
<video> tag is an image or video part holding the file's path, the text between tags text parts.

Labels come from HF's assistant-token mask ({% generation %} blocks around each assistant turn's content and its
<|im_end|>, or the caption and <|endoftext|>): a token is labelled (label = id) when the mask says so, else -100.
No sample has an image or video inside an assistant turn, so the packer's rule that vision tokens are never
labelled is not exercised by the mask.

Images: paths go through transformers' load_image and Qwen2VLImageProcessorPil configured as in
tests/io/media_reference/generate.py (Qwen3-VL's preprocessor_config). The pixel hash is taken from the processor's
own pixel_values: unpatchified, one frame of the temporal pair, un-normalised (x * 127.5 + 127.5, rounded, which
recovers the uint8 values exactly).

Videos: Qwen3VLVideoProcessor imports torch and resizes with torchvision; PyPI has no torchvision for the pinned
torch 2.15.0 (tests/golden/requirements-torch.txt). So the processor's video_processor is a torch-free stand-in
(PyAVQwen3VLVideoProcessor) that does what Qwen3VLVideoProcessor does for the text: frames decoded and sampled by
transformers' read_video_pyav (the "pyav" backend) with Qwen3VLVideoProcessor.sample_frames, sized by its
smart_resize (both executed from transformers' source as tests/io/media_reference/generate.py does), grid_thw as
its patchify computes it, and the VideoMetadata (fps, frame indices) from which Qwen3VLProcessor itself computes
the `<t.t seconds>` timestamps and expands the pads. The frames are resized with Pillow's bicubic, as io/video.h
does (transformers' torchvision resize gives slightly different pixels); their hash is over the frames padded to
an even count by repeating the last one.

Video expansion in transformers 5.24: Qwen3VLProcessor replaces the single <|video_pad|> by the per-frame-pair
text "<t.t seconds><|vision_start|><|video_pad|>*n<|vision_end|>" repeated (SPEC's form). A template that writes
<|vision_start|><|video_pad|><|vision_end|> for a video, as Qwen3-VL's released template does, therefore leaves
one extra <|vision_start|> before the first timestamp and one extra <|vision_end|> after the last frame pair.
The reference follows SPEC (qwen3_vl_chat.jinja writes the bare <|video_pad|>); main() checks that the released
wrapping gives exactly those two extra tokens on the first video sample and records it under "notes".
"""

import argparse
import importlib.util
import json
import types
from pathlib import Path

import av
import numpy as np
import PIL
import tokenizers
import transformers
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_utils import BatchFeature
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import read_video_pyav

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MEDIA_REFERENCE = ROOT / "tests" / "io" / "media_reference" / "generate.py"
# (file under the data folder, modes); sample indices follow the packer: 1-based lines, 0-based array records.
INPUTS = [
    ("cc12m-32/captions.jsonl", ("chat", "caption")),
    ("mllm-demo/mllm_demo.json", ("chat",)),
    ("mllm-demo/mllm_video_demo.json", ("chat",)),
]
TEMPLATES = {"chat": "qwen3_vl_chat.jinja", "caption": "caption.jinja"}
IGNORE = -100


def load_media_reference():
    """tests/io/media_reference/generate.py as a module: its image processor, hash and transformers' video code."""
    spec = importlib.util.spec_from_file_location("media_reference_generate", MEDIA_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PyAVQwen3VLVideoProcessor(VideoProcessorMixin):
    """Qwen3VLVideoProcessor's text-side results without torch (see the module docstring)."""

    patch_size = 16
    temporal_patch_size = 2
    merge_size = 2

    def __init__(self, media_reference):
        super().__init__()
        self.smart_resize, self.sample_frames, defaults, _ = media_reference.hf_video_functions()
        self.owner = types.SimpleNamespace(**defaults)
        self.min_pixels, self.max_pixels = media_reference.VIDEO_MIN_PIXELS, media_reference.VIDEO_MAX_PIXELS
        self.resized = []  # per processed video, in order: uint8 [frames, h, w, 3], padded to an even count

    def __call__(self, videos, **kwargs):
        grids, metadata = [], []
        for path in flatten(videos):
            frames, meta = read_video_pyav(str(path), lambda metadata, **kw: self.sample_frames(self.owner, metadata))
            n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
            rh, rw = self.smart_resize(n, h, w, temporal_factor=self.temporal_patch_size,
                                       factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                                       max_pixels=self.max_pixels)
            resized = [np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames]
            resized += [resized[-1]] * (-n % self.temporal_patch_size)
            self.resized.append(np.stack(resized))
            grids.append([len(resized) // self.temporal_patch_size, rh // self.patch_size, rw // self.patch_size])
            metadata.append(meta)
        return BatchFeature({"video_grid_thw": np.array(grids, dtype=np.int64), "video_metadata": metadata})


def flatten(items):
    if isinstance(items, (list, tuple)):
        return [x for item in items for x in flatten(item)]
    return [items]


class ReferenceProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor accepting the torch-free video processor: ProcessorMixin's class check looks
    VideoProcessorMixin up in the top-level transformers namespace, which exports it only with torchvision; the
    same isinstance check is made against the class imported from its module."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


def positional_hash_u8(array: np.ndarray, media_reference) -> str:
    return media_reference.positional_hash(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def unpatchify_image(rows: np.ndarray, grid_h: int, grid_w: int, patch: int = 16, merge: int = 2) -> np.ndarray:
    """One image's pixel_values rows back to uint8 [h, w, 3] (Qwen2VLImageProcessorPil.patchify's layout:
    (h/m, w/m, m, m) cells of (C, T, p, p) features; mean = std = 0.5)."""
    cells = rows.reshape(grid_h // merge, grid_w // merge, merge, merge, 3, 2, patch, patch)[:, :, :, :, :, 0]
    hwc = cells.transpose(0, 2, 5, 1, 3, 6, 4).reshape(grid_h * patch, grid_w * patch, 3)
    return np.rint(hwc.astype(np.float64) * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


def to_parts(content: str, base: Path, images: list, videos: list) -> list:
    """A messages-format content string as HF content parts; tags consume the sample's image and video lists."""
    parts, pos = [], 0
    while True:
        found = [(content.find(tag, pos), tag) for tag in ("<image>", "<video>")]
        found = [(at, tag) for at, tag in found if at >= 0]
        if not found:
            break
        at, tag = min(found)
        if at > pos:
            parts.append({"type": "text", "text": content[pos:at]})
        if tag == "<image>":
            parts.append({"type": "image", "path": str(base / images.pop(0))})
        else:
            parts.append({"type": "video", "path": str(base / videos.pop(0))})
        pos = at + len(tag)
    if pos < len(content):
        parts.append({"type": "text", "text": content[pos:]})
    return parts


def conversation(sample: dict, base: Path) -> list:
    images, videos = list(sample.get("images", [])), list(sample.get("videos", []))
    conv = [{"role": m["role"], "content": to_parts(m["content"], base, images, videos)} for m in sample["messages"]]
    assert not images and not videos, "tag/list count mismatch in the reference data"
    return conv


def run_length(values) -> list:
    out = []
    for v in values:
        v = int(v)
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def vision_items(ids: list, out, video_processor, first_video: int, tokenizer, media_reference) -> list:
    """Per vision item in sequence order: kind, grid_thw, index of its first pad token, pixel hash."""
    image_pad, video_pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    image_grids = [[int(v) for v in g] for g in out.get("image_grid_thw", [])]
    video_grids = [[int(v) for v in g] for g in out.get("video_grid_thw", [])]
    pixel_values = np.asarray(out["pixel_values"], dtype=np.float32) if image_grids else None
    items, next_image, next_video, image_row, i = [], 0, 0, 0, 0
    while i < len(ids):
        if ids[i] == image_pad:
            t, h, w = image_grids[next_image]
            rows = pixel_values[image_row:image_row + t * h * w]
            items.append({"kind": "image", "grid_thw": [t, h, w], "token_offset": i,
                          "pixels_hash": positional_hash_u8(unpatchify_image(rows, h, w)[None], media_reference)})
            image_row += t * h * w
            next_image += 1
            i += h * w // 4
        elif ids[i] == video_pad:
            t, h, w = video_grids[next_video]
            frames = video_processor.resized[first_video + next_video]
            items.append({"kind": "video", "grid_thw": [t, h, w], "token_offset": i,
                          "pixels_hash": positional_hash_u8(frames, media_reference)})
            next_video += 1
            # Skip this video's frame pairs: pads, <|vision_end|>, the next "<t.t seconds>" and <|vision_start|>.
            pairs_left = t
            while pairs_left:
                while ids[i] == video_pad:
                    i += 1
                pairs_left -= 1
                while pairs_left and ids[i] != video_pad:
                    i += 1
        else:
            i += 1
    assert next_image == len(image_grids) and next_video == len(video_grids)
    assert pixel_values is None or image_row == pixel_values.shape[0]
    return items


def process(proc, template: str, conv: list, media_reference) -> dict:
    first_video = len(proc.video_processor.resized)
    out = proc.apply_chat_template([conv], chat_template=template, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids = [int(v) for v in out["input_ids"][0]]
    mask = [int(v) for v in out["assistant_masks"][0]]
    assert len(ids) == len(mask)
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    items = vision_items(ids, out, proc.video_processor, first_video, proc.tokenizer, media_reference)
    return {"ids": ids, "labels": labels, "items": items}


def check_released_video_wrapping(proc, template: str, conv: list, result: dict, media_reference) -> dict:
    """The same sample through a template wrapping the video pad as the released Qwen3-VL template does."""
    wrapped_template = template.replace("{{- '<|video_pad|>' -}}",
                                       "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}")
    assert wrapped_template != template
    wrapped = process(proc, wrapped_template, conv, media_reference)["ids"]
    ids = result["ids"]
    vision_start, vision_end, video_pad = (proc.tokenizer.convert_tokens_to_ids(t)
                                           for t in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"))
    first_pad = ids.index(video_pad)
    # The video opens its user turn: the released wrapping starts after <|im_start|>, "user" and "\n".
    start = max(i for i in range(first_pad) if ids[i] == proc.tokenizer.convert_tokens_to_ids("<|im_start|>")) + 3
    end = max(i for i, t in enumerate(ids) if t == video_pad) + 2  # past the last pair's <|vision_end|>
    expected = ids[:start] + [vision_start] + ids[start:end] + [vision_end] + ids[end:]
    assert wrapped == expected, "transformers' video expansion changed; revisit qwen3_vl_chat.jinja"
    return {
        "video_expansion": "transformers 5.24 Qwen3VLProcessor replaces the <|video_pad|> token alone by "
                           "'<t.t seconds><|vision_start|><|video_pad|>*n<|vision_end|>' per frame pair; a template "
                           "writing <|vision_start|><|video_pad|><|vision_end|> (Qwen3-VL's released one) gets one "
                           "extra <|vision_start|> before the first timestamp and one extra <|vision_end|> after the "
                           "last pair (checked on the first video sample). This reference follows SPEC: "
                           "qwen3_vl_chat.jinja writes the bare <|video_pad|>."
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "shared" / "data")
    parser.add_argument("--tokenizer", type=Path,
                        default=ROOT / "tests" / "shared" / "assets" / "qwen3-tokenizer" / "tokenizer.json")
    args = parser.parse_args()
    data = args.data.resolve()
    media_reference = load_media_reference()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.tokenizer))
    proc = ReferenceProcessor(image_processor=media_reference.image_processor(), tokenizer=tokenizer,
                              video_processor=PyAVQwen3VLVideoProcessor(media_reference))
    templates = {mode: (HERE / name).read_text() for mode, name in TEMPLATES.items()}

    runs, notes = [], {}
    for mode in ("chat", "caption"):
        files = [name for name, modes in INPUTS if mode in modes]
        samples = []
        for source, name in enumerate(files):
            path = data / name
            if path.suffix == ".jsonl":
                records = [(n, json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1)
                           if line.strip()]
            else:
                records = list(enumerate(json.loads(path.read_text())))
            for index, sample in records:
                conv = conversation(sample, path.parent)
                result = process(proc, templates[mode], conv, media_reference)
                if mode == "chat" and "videos" in sample and not notes:
                    notes = check_released_video_wrapping(proc, templates[mode], conv, result, media_reference)
                samples.append({"source_file": source, "sample_index": index, "tokens": run_length(result["ids"]),
                                "labels": run_length(result["labels"]), "items": result["items"]})
        runs.append({"mode": mode, "inputs": files, "samples": samples})

    reference = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__, "av": av.__version__},
        "templates": TEMPLATES,
        "image_processor": "Qwen2VLImageProcessorPil as tests/io/media_reference/generate.py configures it",
        "video_processor": {"fps": 2, "min_frames": 4, "max_frames": 768,
                            "min_pixels": media_reference.VIDEO_MIN_PIXELS,
                            "max_pixels": media_reference.VIDEO_MAX_PIXELS, "resize": "Pillow BICUBIC"},
        "notes": notes,
        "runs": runs,
    }
    write_reference(args.out / "reference.json", reference)
    counts = ", ".join(f"{r['mode']}: {len(r['samples'])} samples" for r in runs)
    print(f"wrote {args.out / 'reference.json'} ({counts})")


def write_reference(path: Path, reference: dict):
    """Pretty at the top, one compact line per sample, so diffs stay readable and the file small."""
    head = {k: v for k, v in reference.items() if k != "runs"}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append(' "runs": [')
    for r, run in enumerate(reference["runs"]):
        lines.append(f'  {{"mode": {json.dumps(run["mode"])}, "inputs": {json.dumps(run["inputs"])}, "samples": [')
        rows = [f"   {json.dumps(s, separators=(',', ':'))}" for s in run["samples"]]
        lines.append(",\n".join(rows))
        lines.append("  ]}" + ("," if r + 1 < len(reference["runs"]) else ""))
    lines.append(" ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
