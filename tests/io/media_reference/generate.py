"""Generates the reference that tests/io/test_image.cpp and test_video.cpp compare the C++ media code against.

Writes, under --out (tests/io/media_reference):
  inputs/*                small synthetic images made here with Pillow: EXIF orientations 1..8 (JPEG and PNG),
                          grayscale, CMYK, 16-bit, palette, tRNS, RGBA, LA and WebP inputs
  crops/*.png             a 64x64 window of each real image after the processor's resize (uint8 RGB)
  reference.json          per image: decoded size and hash, resized size and hash, grid_thw and the hash of
                          pixel_values; smart_resize and video sizing cases; frame sampling cases; per video the
                          frame count, fps, sampled indices, timestamps, resized size, grid_thw and 8x8 block means
                          of every sampled frame as PyAV decodes it

Images go through transformers' Qwen2VLImageProcessorPil configured as Qwen3-VL's preprocessor_config (patch 16,
merge 2, temporal patch 2, mean = std = 0.5, size shortest_edge 65536 / longest_edge 16777216), after
PIL.Image.open + ImageOps.exif_transpose (transformers.image_utils.load_image's steps before its convert("RGB"),
which is left out so the processor's own alpha handling is the reference; the "drop" hash is convert("RGB")).

Videos: Qwen3VLVideoProcessor needs torch for its resize and normalisation, so its torch-free parts are taken
from transformers' source itself: `smart_resize` and `Qwen3VLVideoProcessor.sample_frames` are extracted from
video_processing_qwen3_vl.py with `ast` and executed as they are; timestamps come from
Qwen3VLProcessor._calculate_timestamps (imported); frames are decoded by transformers.video_utils.read_video_pyav
(the "pyav" backend). Budget as in Qwen3-VL's video_preprocessor_config: shortest_edge 4096, longest_edge 25165824.

Hashes are a 64-bit positional hash of the bytes: sum over i of (b_i + 1) * P^(i + 1) mod 2^64, P = 0x100000001b3
(vectorised in numpy, trivial in C++).
"""

import argparse
import ast
import json
import math
import types
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image, ImageOps
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata, read_video_pyav

IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 4096, 25165824
CROP = 64
HASH_PRIME = np.uint64(0x100000001B3)


def positional_hash(data: bytes) -> str:
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(b.size, HASH_PRIME, dtype=np.uint64), dtype=np.uint64)
        total = np.sum(b * powers, dtype=np.uint64)
    return f"{int(total):016x}"


def hf_video_functions():
    """smart_resize and Qwen3VLVideoProcessor.sample_frames (with its class defaults) from transformers' source."""
    path = Path(transformers.__file__).parent / "models" / "qwen3_vl" / "video_processing_qwen3_vl.py"
    tree = ast.parse(path.read_text())
    funcs, defaults = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "smart_resize":
            funcs["smart_resize"] = node
        if isinstance(node, ast.ClassDef) and node.name == "Qwen3VLVideoProcessor":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "sample_frames":
                    funcs["sample_frames"] = item
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    name = item.targets[0].id
                    if name in ("fps", "min_frames", "max_frames"):
                        defaults[name] = ast.literal_eval(item.value)
    module = ast.Module(body=[funcs["smart_resize"], funcs["sample_frames"]], type_ignores=[])
    namespace = {"np": np, "math": math, "logger": types.SimpleNamespace(warning_once=print), "VideoMetadata": object}
    exec(compile(module, str(path), "exec"), namespace)
    return namespace["smart_resize"], namespace["sample_frames"], defaults, str(path)


def image_processor():
    return Qwen2VLImageProcessorPil(
        size=dict(IMAGE_SIZE), patch_size=16, temporal_patch_size=2, merge_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def make_inputs(out: Path):
    """Small synthetic images covering the decoder's paths. Content is asymmetric so any wrong flip shows."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    h, w = 24, 40
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 6, yy * 10, (xx * yy) % 256], axis=-1).astype(np.uint8)
    rgb[2:6, 3:9] = [255, 0, 0]  # a red mark near the top-left corner
    noise = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    alpha = ((xx * 255) // (w - 1)).astype(np.uint8)
    alpha[:, :4] = 0  # fully transparent columns (their colour must vanish under compositing)
    base = Image.fromarray(rgb, "RGB")
    names = []

    def save(im, name, **kw):
        im.save(inputs / name, **kw)
        names.append(name)

    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(base, f"orient_{orientation}.jpg", quality=95, exif=exif.tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    save(base, "orient_6.png", exif=exif.tobytes())
    save(Image.fromarray(noise, "L"), "gray.jpg", quality=90)
    save(base.convert("CMYK"), "cmyk.jpg", quality=95)
    save(base, "progressive.jpg", quality=85, progressive=True, subsampling="4:2:0")
    save(base, "subsample_422.jpg", quality=85, subsampling="4:2:2")
    save(base, "subsample_444.jpg", quality=85, subsampling="4:4:4")
    save(Image.fromarray(noise, "L"), "gray.png")
    save(Image.fromarray((noise.astype(np.uint16) * 257 + 3).astype(np.uint16)).convert("I;16"), "gray16.png")
    save(base, "rgb.png")
    save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "rgba.png")
    save(Image.fromarray(np.dstack([noise, alpha]), "LA"), "la.png")
    save(base.quantize(16), "palette.png")
    pal = base.quantize(16)
    pal.info["transparency"] = 3
    save(pal, "palette_trns.png", transparency=3)
    save(Image.fromarray(noise, "L"), "gray_trns.png", transparency=int(noise[0, 0]))
    save(base, "lossless.webp", lossless=True)
    save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "rgba.webp", lossless=True)
    save(base, "lossy.webp", quality=80)
    return names


def image_entry(proc, path: Path, label: str, crops: Path | None):
    im = ImageOps.exif_transpose(Image.open(path))
    composite = proc.process_image(im, do_convert_rgb=True)  # CHW uint8, alpha composited onto white
    dropped = np.asarray(im.convert("RGB"))
    decoded = np.ascontiguousarray(np.moveaxis(composite, 0, -1))
    resized = proc.resize(composite, size=SizeDict(**IMAGE_SIZE), resample=PILImageResampling.BICUBIC, factor=32)
    resized_hwc = np.ascontiguousarray(np.moveaxis(resized, 0, -1))
    out = proc(images=[im], return_tensors="np")
    pixel_values = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
    entry = {
        "file": label,
        "decoded": [int(decoded.shape[0]), int(decoded.shape[1])],
        "decoded_hash": positional_hash(decoded.tobytes()),
        "decoded_drop_hash": positional_hash(np.ascontiguousarray(dropped).tobytes()),
        "resized": [int(resized_hwc.shape[0]), int(resized_hwc.shape[1])],
        "resized_hash": positional_hash(resized_hwc.tobytes()),
        "grid_thw": [int(v) for v in out["image_grid_thw"][0]],
        "pixel_values_shape": [int(v) for v in pixel_values.shape],
        "pixel_values_hash": positional_hash(pixel_values.tobytes()),
    }
    if crops is not None:
        top = (resized_hwc.shape[0] - CROP) // 2
        left = (resized_hwc.shape[1] - CROP) // 2
        name = Path(label).stem + ".png"
        Image.fromarray(resized_hwc[top:top + CROP, left:left + CROP]).save(crops / name, optimize=True)
        entry["crop"] = {"file": "crops/" + name, "top": top, "left": left}
    return entry


def smart_resize_cases(video_smart_resize):
    image_cases, video_cases = [], []
    sizes = [(1, 1), (10, 3000), (16, 16), (48, 48), (80, 80), (112, 80), (416, 555), (512, 512), (300, 168),
             (1080, 1920), (4000, 3000), (8000, 6000), (5000, 26), (6000, 29), (33, 7000), (250, 250), (30000, 30000)]
    budgets = [(65536, 16777216), (3136, 1003520), (4096, 25165824), (256 * 256, 256 * 256)]
    for h, w in sizes:
        for lo, hi in budgets:
            try:
                rh, rw = image_processing_pil_qwen2_vl.smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi)
                image_cases.append({"in": [h, w, 32, lo, hi], "out": [rh, rw]})
            except ValueError:
                image_cases.append({"in": [h, w, 32, lo, hi], "out": None})
            for t in (2, 3, 4, 17, 64, 768):
                try:
                    rh, rw = video_smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi)
                    video_cases.append({"in": [t, h, w, 2, 32, lo, hi], "out": [rh, rw]})
                except ValueError:
                    video_cases.append({"in": [t, h, w, 2, 32, lo, hi], "out": None})
    return image_cases, video_cases


def sampling_cases(sample_frames, defaults):
    cases = []
    owner = types.SimpleNamespace(**defaults)
    for total, num, den in [(1, 30, 1), (3, 30, 1), (7, 25, 1), (10, 1, 1), (150, 30, 1), (146, 24000, 1001),
                            (243, 25, 1), (270, 359, 12), (1000, 24, 1), (5, 1, 1), (99999, 30, 1), (30, 2, 1),
                            (17, 2, 1), (2000, 60000, 1001)]:
        for fps in (2.0, 1.0, 0.5, 4.0):
            fps_value = num / den
            metadata = VideoMetadata(total_num_frames=total, fps=fps_value)
            indices = sample_frames(owner, metadata, fps=fps)
            timestamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps_value, 2)
            cases.append({"total": total, "fps_num": num, "fps_den": den, "sample_fps": fps,
                          "indices": [int(i) for i in indices], "timestamps": [float(t) for t in timestamps]})
    return cases


def block_means(frame: np.ndarray, blocks: int = 8):
    h, w, _ = frame.shape
    rows = np.linspace(0, h, blocks + 1).astype(int)
    cols = np.linspace(0, w, blocks + 1).astype(int)
    means = [[[round(float(frame[rows[i]:rows[i + 1], cols[j]:cols[j + 1], c].mean()), 3) for c in range(3)]
              for j in range(blocks)] for i in range(blocks)]
    return means


def video_entry(path: Path, label: str, video_smart_resize, sample_frames, defaults):
    owner = types.SimpleNamespace(**defaults)
    frames, metadata = read_video_pyav(str(path), lambda metadata, **kw: sample_frames(owner, metadata))
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    indices = [int(i) for i in metadata.frames_indices]
    timestamps = Qwen3VLProcessor._calculate_timestamps(None, list(indices), metadata.fps, 2)
    n, h, w = len(indices), int(frames.shape[1]), int(frames.shape[2])
    rh, rw = video_smart_resize(n, h, w, temporal_factor=2, factor=32, min_pixels=VIDEO_MIN_PIXELS,
                                max_pixels=VIDEO_MAX_PIXELS)
    return {
        "file": label,
        "total_frames": int(metadata.total_num_frames),
        "fps_num": int(rate.numerator),
        "fps_den": int(rate.denominator),
        "fps": float(metadata.fps),
        "size": [h, w],
        "indices": indices,
        "timestamps": [float(t) for t in timestamps],
        "resized": [int(rh), int(rw)],
        "grid_thw": [(n + n % 2) // 2, int(rh) // 16, int(rw) // 16],
        "block_means": [block_means(f) for f in frames],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the shared/data folder")
    args = parser.parse_args()
    out, data = args.out, args.data.resolve()
    crops = out / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    video_smart_resize, sample_frames, defaults, video_source = hf_video_functions()
    proc = image_processor()

    images = []
    for path in sorted(data.glob("*/*.jpg")):
        images.append(image_entry(proc, path, str(path.relative_to(data)), crops))
    for name in make_inputs(out):
        images.append(image_entry(proc, out / "inputs" / name, "inputs/" + name, None))

    videos = [video_entry(p, str(p.relative_to(data)), video_smart_resize, sample_frames, defaults)
              for p in sorted(data.glob("*/*.mp4")) + sorted(data.glob("*/*.avi"))]
    image_cases, video_cases = smart_resize_cases(video_smart_resize)
    reference = {
        "versions": {"transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                     "av": __import__("av").__version__},
        "image_processor": {"size": IMAGE_SIZE, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                            "mean": 0.5, "std": 0.5, "resample": "BICUBIC"},
        "video": {"min_pixels": VIDEO_MIN_PIXELS, "max_pixels": VIDEO_MAX_PIXELS, "defaults": defaults,
                  "source": Path(video_source).name},
        "images": images,
        "videos": videos,
        "smart_resize": image_cases,
        "smart_resize_video": video_cases,
        "sampling": sampling_cases(sample_frames, defaults),
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {len(images)} images, {len(videos)} videos, {len(image_cases)} + {len(video_cases)} resize cases")


if __name__ == "__main__":
    main()
