"""Checks that q3vl's Hugging Face export loads in transformers and computes q3vl's logits.

End to end, in a temporary folder: packs a few CC12M caption samples (`q3vl pack`), trains tiny-moe for a few
steps (`q3vl train`, which exports an f32 HF folder at the end), converts the final checkpoint to bf16 and f16 HF
folders (`q3vl convert`), builds a two-sample text + image batch (token ids from the exported tokenizer loaded with
AutoTokenizer, pixel values from the HF image processor, or without Pillow a bit-identical NumPy copy of its steps)
and then, for each export:

- files: model.safetensors.index.json and the shards are what from_pretrained reads (index keys, file names,
  total_size, every key in exactly the shard the index names, safetensors "format": "pt", one dtype);
- config: transformers' config (AutoConfig) has our config.json's value for every key of the file, and q3vl reads
  the config.json that transformers writes back (save_pretrained) to the very same model (bit-identical logits);
- weights: from_pretrained reports no missing, unexpected or mismatched key and every parameter equals its shard
  tensor (the fused experts transposed: on disk x@W, in memory [E, out, in]); bf16 and f16 shards equal torch's
  rounding of the f32 export;
- logits: `q3vl forward` and transformers (fp32, eager attention and experts) on the same batch.h5 agree within
  1e-4 absolute (the golden tests' bound); CE and aux loss within 1e-5 relative.

Then the same for two square-expert configs (tiny-moe with hidden 64 = 2 x moe_intermediate_size 32: gate_up_proj
square; and = moe_intermediate_size 64: down_proj square), trained from a config.json with an f32 export: their
expert tensors must be exported in transformers' layout ([E, 2I, H], [E, H, I]), which from_pretrained keeps as
it is, since it transposes a published-layout tensor only when the shapes differ.

Usage: tests/golden/check_export.sh [--keep] [--work DIR] ...; prints one line per check, exits 1 on any failure.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Qwen3VLMoeForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import check_implementations, hf_inputs, is_expert, write_h5  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ROOT / "tests/shared/data/cc12m-32/captions.jsonl"
TOKENIZER = ROOT / "tests/shared/assets/qwen3-tokenizer"
LOGITS_ATOL = 1e-4  # the golden tests' bound (tests/model/test_golden.cpp): fp32 summation order differs
LOSS_RTOL = 1e-5    # idem for CE and aux loss
SHARD_MB = 16       # small enough that the tiny model spreads over several shards
FLAVOR = ROOT / "jobs/flavors/tiny-moe.json"
SQUARE = {"square_gate_up": 32, "square_down": 64}  # moe_intermediate_size for tiny-moe's hidden 64: H = 2I, H = I
PAD_ID = 151643     # <|endoftext|>
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]  # Qwen3-VL's preprocessor_config.json
IGNORED_KEYS = {"dtype", "transformers_version"}  # bookkeeping, not the model
# Values transformers renames on load: the published Qwen3-VL-MoE files (and ours) give the vision tower the
# parent's model_type, which Qwen3VLMoeConfig.__post_init__ maps to its vision class's type.
ALIASES = {"vision_config.model_type": ("qwen3_vl_moe", "qwen3_vl_moe_vision")}


class Report:
    def __init__(self):
        self.failures = []

    def line(self, tag, text, ok=True):
        print(f"[{tag}] {text}{'' if ok else '  FAIL'}", flush=True)
        if not ok:
            self.failures.append(f"{tag}: {text}")


def run(cmd, log):
    """Runs a q3vl command; its output goes to `log`, which is printed when the command fails."""
    with open(log, "w") as out:
        done = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        command = " ".join(map(str, cmd[:2]))
        sys.exit(f"check_export: {command} failed (exit {done.returncode}):\n{Path(log).read_text()}")


# ---------------------------------------------------------------------------------------------- q3vl side


def train_yaml(model, steps, output_dir):
    return f"""\
model:
{model}
  init_seed: 0
data:
  dir: packed
train:
  steps: {steps}
  seed: 0
optimizer:
  lr: 3.0e-3
logging:
  expert_stats_every: 0
checkpoint:
  keep: 1
  resume: none
export:
  hf: true
  dtype: f32
  shard_mb: {SHARD_MB}
  tokenizer: {TOKENIZER}
output_dir: {output_dir}
"""


def train(q3vl, work, yaml_name, yaml, output_dir):
    (work / yaml_name).write_text(yaml)
    run([q3vl, "train", work / yaml_name], work / f"{output_dir}.log")
    records = [json.loads(l) for l in (work / output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "step"]


def pack_and_train(q3vl, work, samples, steps, report):
    lines = CAPTIONS.read_text().splitlines()[:samples]
    jsonl = work / "samples.jsonl"
    records = []
    for line in lines:
        record = json.loads(line)
        record["images"] = [str(CAPTIONS.parent / name) for name in record["images"]]
        records.append(record)
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))

    t0 = time.time()
    run([q3vl, "pack", "--input", jsonl, "--tokenizer", TOKENIZER / "tokenizer.json", "--out", work / "packed",
         "--min-pixels", 4096, "--max-pixels", 16384, "--max-len", 256, "--quiet"], work / "pack.log")
    summary = json.loads((work / "packed/manifest.json").read_text())["summary"]
    report.line("pack", f"{summary['samples_packed']}/{summary['samples_in']} samples -> {summary['sequences']} "
                f"sequences, {summary['tokens']} tokens, {summary['images']} images ({time.time() - t0:.1f} s)",
                summary["samples_packed"] == samples)

    t0 = time.time()
    losses = train(q3vl, work, "train.yaml", train_yaml("  flavor: tiny-moe", steps, "run"), "run")
    report.line("train", f"tiny-moe {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, f32 export "
                f"({time.time() - t0:.1f} s)", len(losses) == steps)

    exports = {"f32": work / "run/hf"}
    for dtype in ("bf16", "f16"):
        t0 = time.time()
        exports[dtype] = work / f"hf-{dtype}"
        run([q3vl, "convert", "--checkpoint", work / "run", "--out", exports[dtype], "--dtype", dtype,
             "--shard-mb", SHARD_MB, "--tokenizer", TOKENIZER], work / "convert.log")
        report.line("convert", f"final checkpoint -> {dtype} export ({time.time() - t0:.1f} s)")
    return exports


def train_square(q3vl, work, steps, report):
    """tiny-moe with square expert tensors (SQUARE), from a config.json, trained on the same pack with an f32
    export."""
    exports = {}
    for name, intermediate in SQUARE.items():
        config = json.loads(FLAVOR.read_text())
        config["text_config"]["moe_intermediate_size"] = intermediate
        (work / f"{name}.json").write_text(json.dumps(config, indent=2))
        t0 = time.time()
        losses = train(q3vl, work, f"train-{name}.yaml", train_yaml(f"  config: {name}.json", steps, name), name)
        hidden = config["text_config"]["hidden_size"]
        report.line("train", f"{name}: tiny-moe with moe_intermediate_size {intermediate} (hidden {hidden}), "
                    f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, f32 export "
                    f"({time.time() - t0:.1f} s)", len(losses) == steps)
        exports[name] = work / name / "hf"
    return exports


def q3vl_forward(q3vl, model_dir, batch_path, out_path, log):
    run([q3vl, "forward", "--model", model_dir, "--batch", batch_path, "--out", out_path], log)
    with h5py.File(out_path, "r") as f:
        return f["logits"][()], float(f["loss"][()]), float(f["aux_loss"][()])


# ---------------------------------------------------------------------------------------------- the batch


def pixel_values(image, patch, merge, temporal):
    """HF's Qwen2-VL image processor on an already resized uint8 image [H, W, 3] (no further resize). Its PIL
    backend needs Pillow, which the pinned golden venv does not have; without it the same three steps (rescale
    1/255, normalise, patchify in HF's order with the frame repeated over the temporal patch) run here, in HF's
    arithmetic (bit-identical to the processor's output)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescales in float64, then casts
        x = (x - np.float32(IMAGE_MEAN[0])) / np.float32(IMAGE_STD[0])
        x = x.transpose(2, 0, 1)
        c, h, w = x.shape
        gh, gw = h // patch, w // patch
        x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))
        how = "a NumPy copy of HF's processor steps (no Pillow)"
        return x.reshape(gh * gw, c * temporal * patch * patch).astype(np.float32), how
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                                         image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    out = processor(images=[image], do_resize=False, return_tensors="np")
    return out["pixel_values"].astype(np.float32), "HF Qwen2VLImageProcessorPil"


def build_batch(work, export_dir, samples):
    """Two caption samples, right-padded into one batch. Each image is the one q3vl's packer decoded and resized
    (smart_resize to 4096..16384 pixels); the text is the Qwen3-VL chat layout of the sample, tokenised by the
    exported tokenizer, and must equal the packed document's ids and labels."""
    cfg = json.loads((export_dir / "config.json").read_text())["vision_config"]
    patch, merge, temporal = cfg["patch_size"], cfg["spatial_merge_size"], cfg["temporal_patch_size"]
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    records = [json.loads(l) for l in (work / "samples.jsonl").read_text().splitlines()]
    with h5py.File(next((work / "packed").glob("shard-*.h5")), "r") as shard:
        doc_tokens, doc_items = shard["document_tokens"][()], shard["document_items"][()]
        doc_source, grids = shard["document_source"][()], shard["item_grid_thw"][()]
        frames_hw, item_pixels = shard["item_frame_hw"][()], shard["item_pixels"][()]
        ids_packed, labels_packed, pixels = shard["tokens"][()], shard["labels"][()], shard["pixels"]
        rows, images = [], []
        for doc in samples:
            (item,) = range(doc_items[doc], doc_items[doc + 1])
            grid = grids[item]
            _, height, width = frames_hw[item]
            image = pixels[item_pixels[item]:item_pixels[item + 1]].reshape(height, width, 3)
            messages = records[doc_source[doc][1] - 1]["messages"]
            assert messages[0]["content"].startswith("<image>"), messages[0]
            pads = "<|image_pad|>" * int(grid.prod() // merge**2)
            user = f"<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>{messages[0]['content'][7:]}<|im_end|>\n"
            answer = f"{messages[1]['content']}<|im_end|>"
            prompt = tokenizer(user + "<|im_start|>assistant\n", add_special_tokens=False).input_ids
            target = tokenizer(answer, add_special_tokens=False).input_ids
            newline = tokenizer("\n", add_special_tokens=False).input_ids
            ids = prompt + target + newline
            labels = [-100] * len(prompt) + target + [-100] * len(newline)
            span = slice(doc_tokens[doc], doc_tokens[doc + 1])
            same = np.array_equal(ids, ids_packed[span]) and np.array_equal(labels, labels_packed[span])
            values, how = pixel_values(image, patch, merge, temporal)
            rows.append((ids, labels, same))
            images.append((values, grid, how))
    length = max(len(ids) for ids, _, _ in rows)
    batch = {
        "input_ids": np.full((len(rows), length), PAD_ID, np.int64),
        "attention_mask": np.zeros((len(rows), length), np.int64),
        "labels": np.full((len(rows), length), -100, np.int64),
    }
    for b, (ids, labels, _) in enumerate(rows):
        batch["input_ids"][b, :len(ids)] = ids
        batch["attention_mask"][b, :len(ids)] = 1
        batch["labels"][b, :len(ids)] = labels
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = np.where(ids == 151655, 1, np.where(ids == 151656, 2, 0)).astype(np.int64)
    batch["pixel_values"] = np.concatenate([v for v, _, _ in images])
    batch["image_grid_thw"] = np.array([g for _, g, _ in images], np.int64)
    write_h5(work / "batch.h5", batch, {})
    info = {"tokenizer": type(tokenizer).__name__, "packed_equal": all(s for _, _, s in rows),
            "pixels": images[0][2], "grids": ", ".join("x".join(map(str, g)) for _, g, _ in images)}
    return batch, info


# ---------------------------------------------------------------------------------------------- files, config


def read_header(path):
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return header.pop("__metadata__", None), header


def check_files(export_dir, expect_dtype, report, tag):
    """What transformers' sharded loading relies on: the index names each key's shard, the shards are
    model-XXXXX-of-YYYYY.safetensors numbered 1..Y, and each shard holds exactly the keys mapped to it."""
    problems = []
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    if set(index) != {"metadata", "weight_map"}:
        problems.append(f"index top-level keys {sorted(index)}")
    weight_map = index.get("weight_map", {})
    files = sorted(set(weight_map.values()))
    on_disk = sorted(p.name for p in export_dir.glob("*.safetensors"))
    if files != on_disk:
        problems.append(f"index names {files}, folder has {on_disk}")
    names = [re.fullmatch(r"model-(\d{5})-of-(\d{5})\.safetensors", f) for f in files]
    if not all(names) or [int(m[1]) for m in names] != list(range(1, len(files) + 1)) or \
            {int(m[2]) for m in names} != {len(files)}:
        problems.append(f"shard names {files}")
    total, dtypes, keys_seen = 0, set(), {}
    limit = SHARD_MB << 20
    for name in files:
        metadata, header = read_header(export_dir / name)
        if (metadata or {}).get("format") != "pt":
            problems.append(f"{name}: __metadata__ {metadata}, transformers requires format pt")
        mapped = {k for k, f in weight_map.items() if f == name}
        if set(header) != mapped:
            problems.append(f"{name}: holds {sorted(set(header) - mapped)[:3]} unmapped, "
                            f"lacks {sorted(mapped - set(header))[:3]}")
        size = 0
        for key, entry in header.items():
            keys_seen[key] = keys_seen.get(key, 0) + 1
            dtypes.add(entry["dtype"])
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
        if size > limit and len(header) > 1:
            problems.append(f"{name}: {size} bytes in {len(header)} tensors, over the {SHARD_MB} MB shard limit")
        total += size
    if any(n > 1 for n in keys_seen.values()):
        problems.append("keys in several shards: " + ", ".join(k for k, n in keys_seen.items() if n > 1))
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(f"total_size {index.get('metadata', {}).get('total_size')} != {total} bytes of tensors")
    if dtypes != {expect_dtype}:
        problems.append(f"tensor dtypes {sorted(dtypes)}, expected {expect_dtype}")
    report.line(tag, f"files: {len(files)} shards + index, {len(weight_map)} keys, total_size {total}, dtype "
                f"{'/'.join(sorted(dtypes))}" + ("" if not problems else ": " + "; ".join(problems)), not problems)


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from flatten(sub, f"{prefix}{key}.")
    else:
        yield prefix[:-1], value


def hf_value(config, path):
    """transformers' value for a key path of our config.json. Our file writes the rope in the published files'
    legacy form (text_config.rope_theta + rope_scaling), which transformers 5 folds into rope_parameters."""
    parts = path.split(".")
    if parts[0] == "text_config" and parts[1] in ("rope_theta", "rope_scaling"):
        return config.text_config.rope_parameters.get(parts[-1], "<absent>")
    value = config
    for part in parts:
        value = getattr(value, part, "<absent>")
    return value


def check_config(export_dir, report, tag):
    ours = json.loads((export_dir / "config.json").read_text())
    config = AutoConfig.from_pretrained(export_dir)
    compared, aliased, differ = 0, [], []
    for path, value in flatten(ours):
        if path.split(".")[-1] in IGNORED_KEYS:
            continue
        theirs = hf_value(config, path)
        if isinstance(theirs, tuple):
            theirs = list(theirs)
        compared += 1
        if ALIASES.get(path) == (value, theirs):
            aliased.append(f"{path} {value!r} -> {theirs!r}")
        elif theirs != value:
            differ.append(f"{path}: ours {value!r}, transformers {theirs!r}")
    report.line(tag, f"config: {type(config).__name__}, {compared} keys of config.json equal in transformers' "
                f"config (renamed as transformers does for the published files: {', '.join(aliased) or 'none'})"
                + ("" if not differ else ": " + "; ".join(differ)), not differ)
    return config


def check_tokenizer(export_dir, report, tag):
    """The tokenizer files are byte copies of the source folder's, and AutoTokenizer loads them from the export
    with Qwen's special token ids."""
    copied = [p.name for p in sorted(TOKENIZER.iterdir()) if (export_dir / p.name).exists()]
    differ = [n for n in copied if (export_dir / n).read_bytes() != (TOKENIZER / n).read_bytes()]
    missing = [p.name for p in sorted(TOKENIZER.iterdir()) if p.name not in copied]
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|image_pad|>")}
    expected = {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|image_pad|>": 151655}
    ok = not differ and not missing and special == expected
    report.line(tag, f"tokenizer: {type(tokenizer).__name__} loads from the export; {', '.join(copied)} byte-equal "
                f"to {TOKENIZER.relative_to(ROOT)}; {special}"
                + ("" if not differ and not missing else f"; differ {differ}, not copied {missing}"), ok)


# ---------------------------------------------------------------------------------------------- HF side


def load_hf(export_dir, report, tag):
    model, info = AutoModelForImageTextToText.from_pretrained(
        export_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    check_implementations(model)
    bad = {k: sorted(v) for k, v in info.items() if v}
    ok = isinstance(model, Qwen3VLMoeForConditionalGeneration) and not bad
    report.line(tag, f"from_pretrained: {type(model).__name__}, loading info "
                f"{'clean (no missing/unexpected/mismatched keys)' if not bad else bad}", ok)
    return model


def shard_tensors(export_dir):
    tensors = {}
    for path in sorted(export_dir.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(path))
    return tensors


def expert_layout(model, tensors):
    """'published' when every expert tensor is stored x@W ([E, in, out], what q3vl exports unless a config has
    square experts), 'transformers' when every one is stored as transformers holds it ([E, out, in]); None for a
    mixture. The non-square tensors decide, as in q3vl's reader."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layouts = set()
    for key, param in params.items():
        if not is_expert(key) or param.shape[1] == param.shape[2]:
            continue
        layouts.add("transformers" if tensors[key].shape == param.shape else "published")
    return layouts.pop() if len(layouts) == 1 else None


def check_weights(model, tensors, report, tag, layout="published"):
    """Every HF parameter equals its shard tensor upcast to f32; experts are stored in `layout`: published x@W
    [E, in, out] (compared transposed, as HF holds [E, out, in]) or transformers' own [E, out, in]."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found = expert_layout(model, tensors)
    differ = []
    for key, param in params.items():
        disk = tensors[key].to(torch.float32)
        if is_expert(key) and layout == "published":
            disk = disk.transpose(1, 2)
        if disk.shape != param.shape or not torch.equal(disk, param.detach()):
            differ.append(key)
    extra = sorted(set(tensors) - set(params))
    ok = not differ and not extra and found == layout
    report.line(tag, f"weights: experts stored in the {found} layout (expected {layout}); {len(params)} parameters "
                "against their shard tensors: "
                + ("all equal" if not differ and not extra else f"differ {differ[:5]}, unused {extra[:5]}"), ok)


def hf_forward(model, batch):
    with torch.no_grad():
        out = model(**hf_inputs(batch, True))
    logits = out.logits.float()
    labels = torch.from_numpy(batch["labels"])
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    mask = torch.from_numpy(batch["attention_mask"]).reshape(-1).bool()
    k = model.config.text_config.num_experts_per_tok
    gaps = []
    for layer_logits in out.router_logits:
        top = torch.topk(layer_logits.float()[mask], k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]).min().item())
    return logits.numpy(), ce.item(), out.aux_loss.item(), min(gaps)


def compare(tag, q3vl_out, hf_out, report):
    (logits, loss, aux), (hf_logits, hf_loss, hf_aux, gap) = q3vl_out, hf_out
    diff = float(np.abs(logits - hf_logits).max())
    scale = float(np.abs(hf_logits).max())
    report.line(tag, f"logits [{', '.join(map(str, logits.shape))}]: max |q3vl - HF| {diff:.3e} (max |logit| "
                f"{scale:.3f}), bound {LOGITS_ATOL:g}; smallest top-k router gap {gap:.2e}", diff <= LOGITS_ATOL)
    for name, mine, theirs in (("CE loss", loss, hf_loss), ("aux loss", aux, hf_aux)):
        rel = abs(mine - theirs) / abs(theirs)
        report.line(tag, f"{name}: q3vl {mine:.8f}, HF {theirs:.8f}, relative diff {rel:.2e}, bound {LOSS_RTOL:g}",
                    rel <= LOSS_RTOL)


def check_round_trip(q3vl, config, export_dir, work, logits, report, tag):
    """transformers writes our config back (save_pretrained, its own serialisation: rope_parameters,
    num_local_experts, only non-default values ...); q3vl must read that file as the same model."""
    folder = work / f"roundtrip-{tag}"
    folder.mkdir()
    config.save_pretrained(folder)
    for path in export_dir.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    again, _, _ = q3vl_forward(q3vl, folder, work / "batch.h5", work / f"roundtrip-{tag}.h5", work / "roundtrip.log")
    diff = float(np.abs(again - logits).max())
    report.line(tag, f"config round trip: q3vl reads transformers' saved config.json, logits max |diff| {diff:g} "
                "(bound 0: the same model)", diff == 0)


def check_rounding(tag, f32_tensors, tensors, dtype, report):
    differ = [k for k, t in f32_tensors.items() if not torch.equal(t.to(dtype), tensors[k])]
    report.line(tag, f"weights: {tag} shards equal torch's round-to-nearest-even of the f32 export "
                f"({len(f32_tensors)} tensors)" + ("" if not differ else f": differ {differ[:5]}"), not differ)


# ---------------------------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--q3vl", type=Path, required=True, help="the q3vl executable")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed on success)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--samples", type=int, default=8, help="caption samples packed for training")
    parser.add_argument("--steps", type=int, default=4, help="training steps")
    args = parser.parse_args()
    if args.samples < 2 or args.steps < 1:
        parser.error("--samples must be at least 2 (the batch holds two) and --steps at least 1")

    start = time.time()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = args.work or Path(tempfile.mkdtemp(prefix="q3vl-check-export-"))
    work.mkdir(parents=True, exist_ok=True)
    q3vl = args.q3vl.resolve()
    print(f"check_export: {q3vl}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"safetensors {safetensors.__version__}; work folder {work}", flush=True)
    report = Report()

    exports = pack_and_train(q3vl, work, args.samples, args.steps, report)
    batch, info = build_batch(work, exports["f32"], samples=[0, 1])
    report.line("batch", f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} tokens "
                f"({int(batch['attention_mask'].sum())} real), images {info['grids']}; ids from AutoTokenizer"
                f"(export) = {info['tokenizer']}, equal to the packed documents' ids and labels: "
                f"{'yes' if info['packed_equal'] else 'NO'}; pixel values by {info['pixels']}", info["packed_equal"])

    tensors = {}
    for tag, dtype in (("f32", "F32"), ("bf16", "BF16"), ("f16", "F16")):
        t0 = time.time()
        export_dir = exports[tag]
        check_files(export_dir, dtype, report, tag)
        config = check_config(export_dir, report, tag)
        check_tokenizer(export_dir, report, tag)
        model = load_hf(export_dir, report, tag)
        tensors[tag] = shard_tensors(export_dir)
        check_weights(model, tensors[tag], report, tag)
        q3vl_out = q3vl_forward(q3vl, export_dir, work / "batch.h5", work / f"q3vl-{tag}.h5", work / "forward.log")
        compare(tag, q3vl_out, hf_forward(model, batch), report)
        check_round_trip(q3vl, config, export_dir, work, q3vl_out[0], report, tag)
        print(f"[{tag}] ({time.time() - t0:.1f} s)", flush=True)
    check_rounding("bf16", tensors["f32"], tensors["bf16"], torch.bfloat16, report)
    check_rounding("f16", tensors["f32"], tensors["f16"], torch.float16, report)

    for tag, export_dir in train_square(q3vl, work, args.steps, report).items():
        t0 = time.time()
        check_files(export_dir, "F32", report, tag)
        model = load_hf(export_dir, report, tag)
        check_weights(model, shard_tensors(export_dir), report, tag, layout="transformers")
        q3vl_out = q3vl_forward(q3vl, export_dir, work / "batch.h5", work / f"q3vl-{tag}.h5", work / "forward.log")
        compare(tag, q3vl_out, hf_forward(model, batch), report)
        print(f"[{tag}] ({time.time() - t0:.1f} s)", flush=True)

    verdict = "PASS" if not report.failures else f"FAIL ({len(report.failures)} checks)"
    print(f"check_export: {verdict} in {time.time() - start:.0f} s", flush=True)
    if args.keep or report.failures:
        print(f"check_export: work folder kept: {work}")
    elif args.work is None:
        shutil.rmtree(work)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
