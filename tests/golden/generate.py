"""Generates the Hugging Face golden fixtures that the C++ parity tests compare against.

Writes, under --out (tests/golden):
  fixtures/<model>/{config.json, model.safetensors}     tiny random fp32 models (save_pretrained, on-disk layout)
  fixtures/<model>/<case>/batch.h5                      HF forward arguments (input_ids, pixel_values, ...)
  fixtures/<model>/<case>/expected.h5                   logits, CE loss, aux loss and intermediate activations
  fixtures/<model>/<case>/grads.safetensors             d(CE + coef*aux)/d(parameter), checkpoint keys and layout
  fixtures/manifest.json                                versions, models, cases and what each covers
  hf_param_counts.json                                  HF num_parameters() of the published Qwen3-VL flavors
  hf_timing.json                                        HF fp32 CPU forward+backward time, largest model and case
README.md beside this script documents every dataset.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

# One thread while generating: the models are tiny, and verify.py re-runs them expecting bit-identical results,
# which holds only for the same thread count. The timing uses two threads, as the C++ benchmarks do.
TORCH_THREADS = 1
TIMING_THREADS = 2
FIXTURE_BUDGET_BYTES = 20_000_000
# Smallest allowed gap between the k-th and (k+1)-th router logit of any token. Below it a fp32 rounding difference
# in the C++ port (router logits are O(5), their fp32 error after a few layers about 1e-5) could flip the expert
# choice and make the fixture useless, so such weights are redrawn.
MIN_ROUTER_LOGIT_GAP = 1e-3
PATCH_FEATURES = 3 * 2 * 16 * 16
RELOAD_CASE = "image_video"  # run again through from_pretrained to check the saved checkpoint (else the first case)

# Token ids of the tiny vocabulary. They mirror the roles of Qwen's special tokens at small ids.
VOCAB = 300
PAD = 250  # <|endoftext|>
IM_START = 251
IM_END = 252
VISION_START = 253
VISION_END = 254
IMAGE_PAD = 255
VIDEO_PAD = 256
ROLE_TOKENS = {"system": 200, "user": 201, "assistant": 202}
NEWLINE = 203
# Timestamp text "<t.t seconds>": '<', digits 0-9, '.', ' seconds>'.
TS_OPEN, TS_DIGIT0, TS_DOT, TS_CLOSE = 210, 211, 221, 222
TEXT_TOKENS = (1, 200)  # ordinary text is drawn uniformly from [1, 200)


# ---------------------------------------------------------------------------------------------- models


def text_rope(theta, section):
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": section, "mrope_interleaved": True}


MODELS = {
    "moe": {
        "cls": Qwen3VLMoeForConditionalGeneration,
        "config_cls": Qwen3VLMoeConfig,
        "seed": 11,
        "description": "qwen3_vl_moe, 3 MoE layers (4 experts, top-2, moe_intermediate 24), GQA 4q/2kv, head_dim 8 "
        "(= hidden/heads), mrope [2,1,1]; vision 3 blocks, 8x8 position table, deepstack [0,1]; untied lm_head.",
        "text": dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[], rope_parameters=text_rope(5e6, [2, 1, 1]),
        ),
        "vision": dict(
            depth=3, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        ),
        "tie": False,
        "aux_coef": 0.001,
        "cases": ["image_single", "images_multi", "video_timestamps", "image_video", "text_only", "padded_batch2",
                  "multiturn_masked"],
    },
    "moe_mixed": {
        "cls": Qwen3VLMoeForConditionalGeneration,
        "config_cls": Qwen3VLMoeConfig,
        "seed": 12,
        "description": "qwen3_vl_moe, 6 layers with decoder_sparse_step 2 and mlp_only_layers [3] -> MoE at layers "
        "1 and 5, dense SwiGLU at 0, 2, 3, 4; 6 experts top-3, moe_intermediate 12 (non-square experts); "
        "GQA 4q/1kv with head_dim 16 (q_proj 32 -> 64), mrope [4,2,2]; vision 4x4 position table, "
        "deepstack [1,2]; untied lm_head; router_aux_loss_coef 0.05 (not 0.001) so that the aux-loss "
        "gradient is about 1% of the router gradient instead of 0.02%.",
        "text": dict(
            hidden_size=32, intermediate_size=40, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, moe_intermediate_size=12, num_experts=6, num_experts_per_tok=3, decoder_sparse_step=2,
            mlp_only_layers=[3], rope_parameters=text_rope(1e4, [4, 2, 2]),
        ),
        "vision": dict(
            depth=3, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
            num_position_embeddings=16, deepstack_visual_indexes=[1, 2],
        ),
        "tie": False,
        "aux_coef": 0.05,
        "cases": ["images_multi", "image_video", "padded_batch2", "multiturn_masked"],
    },
    "dense": {
        "cls": Qwen3VLForConditionalGeneration,
        "config_cls": Qwen3VLConfig,
        "seed": 13,
        "description": "qwen3_vl (dense), 3 layers SwiGLU 48, MHA 4q/4kv, head_dim 8, mrope [2,1,1]; vision hidden 24 "
        "with 2 heads (head_dim 12), 8x8 position table, deepstack [0,2]; tied embeddings (no lm_head key).",
        "text": dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, rope_parameters=text_rope(5e6, [2, 1, 1]),
        ),
        "vision": dict(
            depth=3, hidden_size=24, num_heads=2, intermediate_size=40, out_hidden_size=32,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 2],
        ),
        "tie": True,
        "cases": ["image_single", "image_video", "padded_batch2", "text_only"],
    },
    # Square expert tensors, as transformers' own save_pretrained writes them (its in-memory layout, see
    # save_model): the reader must take the layout from the layer's other, non-square expert tensor.
    "moe_square_gate_up": {
        "cls": Qwen3VLMoeForConditionalGeneration,
        "config_cls": Qwen3VLMoeConfig,
        "seed": 14,
        "description": "qwen3_vl_moe saved by transformers' save_pretrained (experts in its layout), hidden 16 = 2 x "
        "moe_intermediate 8: gate_up_proj [4, 16, 16] is square, down_proj [4, 16, 8] is not; 2 MoE layers, 4 experts "
        "top-2, GQA 2q/1kv, head_dim 8, mrope [2,1,1]; vision 1 block of width 8 (unused by its text-only case).",
        "text": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[], rope_parameters=text_rope(5e6, [2, 1, 1]),
        ),
        "vision": dict(
            depth=1, hidden_size=8, num_heads=1, intermediate_size=8, out_hidden_size=16,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        "tie": False,
        "aux_coef": 0.001,
        "expert_layout": "transformers",
        "cases": ["text_only"],
    },
    "moe_square_down": {
        "cls": Qwen3VLMoeForConditionalGeneration,
        "config_cls": Qwen3VLMoeConfig,
        "seed": 15,
        "description": "qwen3_vl_moe saved by transformers' save_pretrained (experts in its layout), hidden 16 = "
        "moe_intermediate 16: down_proj [4, 16, 16] is square, gate_up_proj [4, 32, 16] is not; 2 MoE layers, 4 "
        "experts top-2, GQA 2q/1kv, head_dim 8, mrope [2,1,1]; vision 1 block of width 8 (unused by its text-only "
        "case).",
        "text": dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[], rope_parameters=text_rope(5e6, [2, 1, 1]),
        ),
        "vision": dict(
            depth=1, hidden_size=8, num_heads=1, intermediate_size=8, out_hidden_size=16,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        "tie": False,
        "aux_coef": 0.001,
        "expert_layout": "transformers",
        "cases": ["text_only"],
    },
}


def build_config(spec):
    text = dict(
        spec["text"], vocab_size=VOCAB, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
        bos_token_id=PAD, eos_token_id=IM_END,
    )
    if spec["cls"] is Qwen3VLMoeForConditionalGeneration:
        text["router_aux_loss_coef"] = spec["aux_coef"]
    if spec["tie"]:
        text["tie_word_embeddings"] = True
    vision = dict(
        spec["vision"], patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
        hidden_act="gelu_pytorch_tanh",
    )
    return spec["config_cls"](
        text_config=text, vision_config=vision, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=spec["tie"],
    )


def is_moe(model):
    return isinstance(model, Qwen3VLMoeForConditionalGeneration)


def instantiate(spec, config):
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if spec["cls"] is Qwen3VLMoeForConditionalGeneration:
        kwargs["experts_implementation"] = "eager"
    model = spec["cls"]._from_config(config, **kwargs)
    check_implementations(model)
    return model


def check_implementations(model):
    configs = [model.config, model.config.text_config, model.config.vision_config]
    for cfg in configs:
        assert cfg._attn_implementation == "eager", cfg._attn_implementation
        if is_moe(model):
            assert cfg._experts_implementation == "eager", cfg._experts_implementation


def randomize(model, seed):
    """Draws every parameter so that each one matters: HF's init leaves norms at 1 and biases at 0, and its 0.02
    std makes routing and attention nearly uniform. Scales keep activations O(1) through the tiny stacks."""
    gen = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings

    def normal(p, std, mean=0.0):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            normal(p, 0.1, 1.0)
        elif leaf == "bias":
            normal(p, 0.1)
        elif name.endswith("embed_tokens.weight"):
            normal(p, 0.25 if tied else 1.0)
        elif name.endswith("pos_embed.weight"):
            normal(p, 0.5)
        elif name.endswith("mlp.gate.weight"):
            normal(p, 2.0 / p.shape[1] ** 0.5)  # decisive routing keeps top-k far from ties
        elif is_expert(name):
            normal(p, 1.0 / p.shape[2] ** 0.5)  # in-memory [E, out, in]
        else:  # nn.Linear [out, in] and the Conv3d patch embedding [out, C, T, P, P]
            normal(p, 1.0 / p[0].numel() ** 0.5)


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class Sample:
    ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    images: list = field(default_factory=list)  # (grid, pixels)
    videos: list = field(default_factory=list)

    def add(self, tokens, train=False):
        self.ids += tokens
        self.labels += tokens if train else [-100] * len(tokens)


def timestamp_tokens(seconds):
    text = f"{seconds:.1f}"
    return [TS_OPEN] + [TS_DOT if c == "." else TS_DIGIT0 + int(c) for c in text] + [TS_CLOSE]


def build_sample(turns, rng):
    """turns: [(role, parts)], parts: ("text", n) | ("image", (h, w)) | ("video", (t, h, w), [seconds per t]).
    Follows the chat template: <|im_start|>role\\n content <|im_end|>\\n, training on assistant content and
    <|im_end|> only. Grids are in 16-pixel patches; an image has t=1 (two identical frames after the processor)."""
    s = Sample()
    for role, parts in turns:
        train = role == "assistant"
        s.add([IM_START, ROLE_TOKENS[role], NEWLINE])
        for part in parts:
            kind = part[0]
            if kind == "text":
                s.add(rng.integers(*TEXT_TOKENS, size=part[1]).tolist(), train)
            elif kind == "image":
                h, w = part[1]
                s.add([VISION_START] + [IMAGE_PAD] * (h * w // 4) + [VISION_END])
                s.images.append(([1, h, w], rng.uniform(-1, 1, (h * w, PATCH_FEATURES)).astype(np.float32)))
            elif kind == "video":
                (t, h, w), seconds = part[1], part[2]
                assert len(seconds) == t
                for sec in seconds:
                    s.add(timestamp_tokens(sec) + [VISION_START] + [VIDEO_PAD] * (h * w // 4) + [VISION_END])
                s.videos.append(([t, h, w], rng.uniform(-1, 1, (t * h * w, PATCH_FEATURES)).astype(np.float32)))
            else:
                raise ValueError(kind)
        s.add([IM_END], train)
        s.add([NEWLINE])
    return s


CASES = {
    "image_single": {
        "seed": 101,
        "covers": "one 6x8-patch image (12 tokens): patch embed, position-table resampling to a non-square grid, "
        "vision rotary, merger and deepstack, image mrope positions",
        "samples": [[("user", [("image", (6, 8)), ("text", 5)]), ("assistant", [("text", 8)])]],
    },
    "images_multi": {
        "seed": 102,
        "covers": "three images of different sizes (4x4, 6x4, 4x8) in one sample, two of them adjacent: "
        "block-diagonal vision attention, feature order, positions restarting after each image",
        "samples": [[
            ("user", [("text", 3), ("image", (4, 4)), ("text", 2), ("image", (6, 4)), ("image", (4, 8)),
                      ("text", 4)]),
            ("assistant", [("text", 7)]),
        ]],
    },
    "video_timestamps": {
        "seed": 103,
        "covers": "one video with 2 temporal patches (grid 2x4x6): each frame pair is its own span preceded by "
        "'<t.t seconds>' text tokens; video_grid_thw split per temporal patch for positions",
        "samples": [[("user", [("video", (2, 4, 6), [0.5, 1.5]), ("text", 4)]), ("assistant", [("text", 8)])]],
    },
    "image_video": {
        "seed": 104,
        "covers": "image, video (2x4x4, timestamps), image in one sample: image and video features scattered to "
        "their own pad tokens, deepstack features joined in sequence order",
        "samples": [[
            ("user", [("image", (4, 4)), ("text", 2), ("video", (2, 4, 4), [1.0, 3.0]), ("text", 2),
                      ("image", (2, 6)), ("text", 3)]),
            ("assistant", [("text", 6)]),
        ]],
    },
    "text_only": {
        "seed": 105,
        "covers": "system/user/assistant text, no vision inputs: plain 1-D positions on all three mrope rows",
        "samples": [[("system", [("text", 6)]), ("user", [("text", 10)]), ("assistant", [("text", 12)])]],
    },
    "padded_batch2": {
        "seed": 106,
        "covers": "batch of 2 right-padded to the longer sample (attention_mask 0, labels -100, pad id "
        f"{PAD}); sample 0 has an image, sample 1 a video: padding excluded from CE and aux loss, positions per "
        "sample, deepstack across the batch",
        "samples": [
            [("user", [("image", (4, 6)), ("text", 6)]), ("assistant", [("text", 10)])],
            [("user", [("video", (2, 4, 4), [0.5, 1.5]), ("text", 2)]), ("assistant", [("text", 3)])],
        ],
    },
    "multiturn_masked": {
        "seed": 107,
        "covers": "system + two user/assistant rounds with an image: labels on two separate assistant spans, "
        "everything else ignored (-100)",
        "samples": [[
            ("system", [("text", 4)]), ("user", [("image", (4, 4)), ("text", 3)]), ("assistant", [("text", 5)]),
            ("user", [("text", 4)]), ("assistant", [("text", 6)]),
        ]],
    },
}


def build_batch(case):
    rng = np.random.default_rng(case["seed"])
    samples = [build_sample(turns, rng) for turns in case["samples"]]
    length = max(len(s.ids) for s in samples)
    batch = {
        "input_ids": np.full((len(samples), length), PAD, np.int64),
        "attention_mask": np.zeros((len(samples), length), np.int64),
        "labels": np.full((len(samples), length), -100, np.int64),
    }
    for b, s in enumerate(samples):
        n = len(s.ids)
        batch["input_ids"][b, :n] = s.ids
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = s.labels
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = np.where(ids == IMAGE_PAD, 1, np.where(ids == VIDEO_PAD, 2, 0)).astype(np.int64)
    images = [item for s in samples for item in s.images]
    videos = [item for s in samples for item in s.videos]
    if images:
        batch["pixel_values"] = np.concatenate([p for _, p in images])
        batch["image_grid_thw"] = np.array([g for g, _ in images], np.int64)
    if videos:
        batch["pixel_values_videos"] = np.concatenate([p for _, p in videos])
        batch["video_grid_thw"] = np.array([g for g, _ in videos], np.int64)
    return batch


# ---------------------------------------------------------------------------------------------- running HF


def hf_inputs(batch, moe):
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"].to(torch.int32)
    if moe:
        inputs["output_router_logits"] = True
    return inputs


def run_case(model, batch):
    """One HF forward with labels and backward of HF's total loss. Returns the arrays for expected.h5."""
    moe = is_moe(model)
    model.zero_grad(set_to_none=True)
    layer_inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args: layer_inputs.append(args[0].detach().clone()))
        for layer in model.model.language_model.layers
    ]
    final_hidden = []
    hooks.append(model.model.language_model.norm.register_forward_hook(
        lambda _m, _a, out: final_hidden.append(out.detach().clone())))
    try:
        out = model(**hf_inputs(batch, moe))
    finally:
        for h in hooks:
            h.remove()

    labels = torch.from_numpy(batch["labels"])
    vocab = out.logits.shape[-1]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    coef = model.config.text_config.router_aux_loss_coef if moe else 0.0
    aux = out.aux_loss if moe else torch.zeros(())
    # HF's loss already adds coef * aux; the separately computed CE must agree with it.
    assert torch.allclose(out.loss, ce + coef * aux, rtol=1e-6, atol=1e-6), (out.loss.item(), ce.item(), aux.item())
    out.loss.backward()

    expected = {
        "logits": out.logits.detach().numpy(),
        "loss": np.float32(ce.item()),
        "aux_loss": np.float32(aux.item()),
        "total_loss": np.float32(out.loss.item()),
        "router_aux_loss_coef": np.float32(coef),
        "position_ids": hf_positions(model, batch),
        "layer_inputs": torch.stack(layer_inputs).numpy(),
        "final_hidden": final_hidden[0].numpy(),
    }
    if moe:
        expected["router_logits"] = torch.stack([r.detach() for r in out.router_logits]).numpy()
        expected["moe_layers"] = np.array(moe_layers(model), np.int64)
    for kind, outputs in (("image", out.image_outputs), ("video", out.video_outputs)):
        if outputs is not None:
            expected[f"{kind}_embeds"] = torch.cat(outputs.pooler_output).detach().numpy()
            expected[f"{kind}_deepstack"] = torch.stack(
                [torch.cat(f) for f in outputs.deepstack_features]).detach().numpy()
    return expected


def hf_positions(model, batch):
    """The [3, B, S] mrope positions HF's forward uses, from the same helper it calls."""
    grids = {k: torch.from_numpy(batch[k]) if k in batch else None for k in ("image_grid_thw", "video_grid_thw")}
    positions = model.model.compute_3d_position_ids(
        input_ids=torch.from_numpy(batch["input_ids"]), inputs_embeds=None, **grids,
        attention_mask=torch.from_numpy(batch["attention_mask"]),
        mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
    )
    if positions is None:  # no vision inputs: the text model falls back to arange on every row
        return np.broadcast_to(np.arange(batch["input_ids"].shape[1]), (3, *batch["input_ids"].shape)).copy()
    return positions.numpy()


def moe_layers(model):
    return [i for i, layer in enumerate(model.model.language_model.layers) if hasattr(layer.mlp, "experts")]


def router_margin(model, batch):
    """Smallest gap between the k-th and (k+1)-th router logit over all tokens and MoE layers (softmax is monotonic,
    so the logit order is the routing order)."""
    with torch.no_grad():
        out = model(**hf_inputs(batch, True))
    k = model.config.text_config.num_experts_per_tok
    margins = []
    for logits in out.router_logits:
        top = torch.topk(logits.float(), k + 1, dim=-1).values
        margins.append((top[:, k - 1] - top[:, k]).min().item())
    return min(margins)


# ---------------------------------------------------------------------------------------------- writing


def write_h5(path, arrays, attrs):
    with h5py.File(path, "w", track_order=True) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, value in arrays.items():
            value = np.asarray(value)  # scalars stay 0-d (HDF5 scalar dataspace)
            f.create_dataset(name, data=value if value.flags.c_contiguous else value.copy(), track_times=False)


def is_expert(key):
    return key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj")


def to_checkpoint_layout(key, tensor, text):
    """In-memory tensor -> layout of the published Qwen checkpoints. HF 5 keeps the fused experts as nn.Linear-style
    [E, out, in] in memory, while the checkpoints store x@W [E, in, out]: gate_up_proj [E, H, 2I], down_proj
    [E, I, H]. Everything else is stored as it is held."""
    if not is_expert(key):
        return tensor
    disk = tensor.transpose(1, 2)
    hidden, inter = text.hidden_size, text.moe_intermediate_size
    want = (text.num_experts, hidden, 2 * inter) if key.endswith("gate_up_proj") else (text.num_experts, inter, hidden)
    assert tuple(disk.shape) == want, (key, tuple(disk.shape), want)
    return disk


def checkpoint_keys(model, tmp):
    """Keys that save_pretrained writes (tied lm_head left out). transformers 5.24 writes every tensor, the experts
    included, exactly as it holds it in memory."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = safetensors.torch.load_file(Path(tmp) / "model.safetensors")
    for key, tensor in saved.items():
        assert torch.equal(params[key].detach(), tensor), key
    missing = set(params) - set(saved)
    assert missing <= {"lm_head.weight"} and (not missing or model.config.tie_word_embeddings), missing
    return sorted(saved)


def save_model(model, model_dir, expert_layout):
    """config.json from save_pretrained. model.safetensors: for expert_layout "published", the checkpoint layout
    with sorted keys and fixed metadata (so that regenerating gives identical bytes); for "transformers", the file
    save_pretrained wrote, experts in its in-memory layout ([E, 2I, H], [E, H, I])."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "config.json", model_dir / "config.json")
        keys = checkpoint_keys(model, tmp)
        if expert_layout == "transformers":
            shutil.copy(Path(tmp) / "model.safetensors", model_dir / "model.safetensors")
            return keys
    assert expert_layout == "published", expert_layout
    params = dict(model.named_parameters(remove_duplicate=False))
    text = model.config.text_config
    tensors = {key: to_checkpoint_layout(key, params[key].detach(), text).contiguous() for key in keys}
    # HF decides whether to transpose an expert tensor on load by comparing shapes; a square one would load wrongly.
    for key in filter(is_expert, keys):
        assert tensors[key].shape[1] != tensors[key].shape[2], f"{key}: square expert tensor is ambiguous for HF"
    safetensors.torch.save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return keys


def save_grads(model, keys, batch, path):
    """d(total loss)/d(checkpoint tensor) for every checkpoint key, in the checkpoint layout (a transpose of a
    gradient is the gradient of the transpose). The vision tower's gradient is zero without pixels (autograd
    leaves it None)."""
    has_vision = "pixel_values" in batch or "pixel_values_videos" in batch
    params = dict(model.named_parameters(remove_duplicate=False))
    text = model.config.text_config
    grads = {}
    for key in keys:
        grad = params[key].grad
        if grad is None:
            assert key.startswith("model.visual.") and not has_vision, f"{key} received no gradient"
            grad = torch.zeros_like(params[key])
        grads[key] = to_checkpoint_layout(key, grad, text).contiguous().clone()
    safetensors.torch.save_file(grads, path, metadata={"format": "pt"})


def check_reload(spec, model, model_dir, batch, logits_expected):
    """The saved directory, experts in the checkpoint layout, must load back in HF (whose loader transposes them)
    to the very same parameters and reproduce the logits bit for bit."""
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if spec["cls"] is Qwen3VLMoeForConditionalGeneration:
        kwargs["experts_implementation"] = "eager"
    reloaded = spec["cls"].from_pretrained(model_dir, **kwargs)
    check_implementations(reloaded)
    mine = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in reloaded.named_parameters(remove_duplicate=False):
        assert torch.equal(tensor, mine[key]), f"{key} does not survive save and reload"
    with torch.no_grad():
        logits = reloaded(**hf_inputs(batch, False)).logits.numpy()
    assert np.array_equal(logits, logits_expected), np.abs(logits - logits_expected).max()


# ---------------------------------------------------------------------------------------------- param counts


def dense_text(hidden, layers, heads, kv_heads, ffn):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                intermediate_size=ffn)


def moe_text(hidden, layers, heads, kv_heads, ffn, expert_ffn):
    return dict(dense_text(hidden, layers, heads, kv_heads, ffn), moe_intermediate_size=expert_ffn, num_experts=128,
                num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[])


def published_flavors():
    """Key numbers of the published Qwen3-VL config.json files (Qwen/Qwen3-VL-*-Instruct):
    name -> (dense or MoE, text config, vision config, tied embeddings)."""
    vision_small = dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])
    vision_large = dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24])
    return {
        "Qwen3-VL-2B": ("dense", dense_text(2048, 28, 16, 8, 6144), vision_small, True),
        "Qwen3-VL-4B": ("dense", dense_text(2560, 36, 32, 8, 9728), vision_small, True),
        "Qwen3-VL-8B": ("dense", dense_text(4096, 36, 32, 8, 12288), vision_large, False),
        "Qwen3-VL-32B": ("dense", dense_text(5120, 64, 64, 8, 25600), vision_large, False),
        "Qwen3-VL-30B-A3B": ("moe", moe_text(2048, 48, 32, 4, 6144, 768), vision_large, False),
        "Qwen3-VL-235B-A22B": ("moe", moe_text(4096, 94, 64, 4, 12288, 1536), vision_large, False),
    }


def param_counts():
    counts = {}
    classes = {"dense": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
               "moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)}
    for name, (kind, text, vision, tie) in published_flavors().items():
        config_cls, model_cls = classes[kind]
        text = dict(text, vocab_size=151936, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                    max_position_embeddings=262144, rope_parameters=text_rope(5e6, [24, 20, 20]),
                    tie_word_embeddings=tie)
        vision = dict(vision, num_heads=16, out_hidden_size=text["hidden_size"], num_position_embeddings=2304,
                      patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                      hidden_act="gelu_pytorch_tanh")
        config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie)
        with torch.device("meta"):
            model = model_cls(config)
        counts[name] = {
            "model_type": config.model_type,
            "num_parameters": model.num_parameters(),
            "vision_parameters": model.model.visual.num_parameters(),
            "text_parameters": model.model.language_model.num_parameters(),
            "lm_head_parameters": 0 if tie else model.lm_head.weight.numel(),
            "tie_word_embeddings": tie,
            "text_config": text,
            "vision_config": vision,
        }
    return counts


# ---------------------------------------------------------------------------------------------- main


def time_fwd_bwd(model, batch, threads, repeats=10):
    torch.set_num_threads(threads)
    inputs = hf_inputs(batch, is_moe(model))
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**inputs).loss.backward()
        if i:  # the first run warms up allocators and caches
            times.append(time.perf_counter() - start)
    torch.set_num_threads(TORCH_THREADS)
    return {"torch_threads": threads, "repeats": repeats, "seconds_median": statistics.median(times),
            "seconds_min": min(times)}


def dir_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def draw_model(name, spec, config, batches):
    """Random weights from the model's seed, redrawn (seed + 1000) while some token's routing is a near tie."""
    seed = spec["seed"]
    while True:
        model = instantiate(spec, config)
        randomize(model, seed)
        if not is_moe(model):
            return model, seed, None
        margin = min(router_margin(model, batches[case]) for case in spec["cases"])
        if margin >= MIN_ROUTER_LOGIT_GAP:
            return model, seed, margin
        print(f"{name}: weight seed {seed} has router logit gap {margin:.2e}; redrawing", file=sys.stderr)
        seed += 1000


def write_model(name, spec, batches, model_dir):
    """Writes one model's checkpoint and its cases; returns the model and its manifest entry."""
    config = build_config(spec)
    model, seed, margin = draw_model(name, spec, config, batches)
    model_dir.mkdir()
    expert_layout = spec.get("expert_layout", "published")
    keys = save_model(model, model_dir, expert_layout)
    results = {}
    reload_case = RELOAD_CASE if RELOAD_CASE in spec["cases"] else spec["cases"][0]
    for case_name in spec["cases"]:
        batch = batches[case_name]
        case_dir = model_dir / case_name
        case_dir.mkdir()
        expected = run_case(model, batch)
        write_h5(case_dir / "batch.h5", batch, {"case": case_name})
        write_h5(case_dir / "expected.h5", expected, {"case": case_name, "model": name})
        save_grads(model, keys, batch, case_dir / "grads.safetensors")
        results[case_name] = {"loss": float(expected["loss"]), "aux_loss": float(expected["aux_loss"]),
                              "total_loss": float(expected["total_loss"])}
        print(f"{name}/{case_name}: loss {expected['loss']:.6f} aux {expected['aux_loss']:.6f}")
        if case_name == reload_case:
            check_reload(spec, model, model_dir, batch, expected["logits"])
    entry = {
        "architecture": type(model).__name__, "model_type": config.model_type, "description": spec["description"],
        "weight_seed": seed, "num_parameters": model.num_parameters(), "tie_word_embeddings": spec["tie"],
        "moe_layers": moe_layers(model) if is_moe(model) else [],
        "router_aux_loss_coef": spec.get("aux_coef", 0.0), "min_router_logit_gap": margin,
        "checkpoint_keys": len(keys), "expert_keys": sum(map(is_expert, keys)),
        "expert_layout": expert_layout if is_moe(model) else None, "cases": spec["cases"],
        "results": results,
    }
    return model, entry


def describe_cases(batches):
    return {name: {"covers": case["covers"], "batch_size": int(batches[name]["input_ids"].shape[0]),
                   "seq_len": int(batches[name]["input_ids"].shape[1]),
                   "image_grid_thw": batches[name].get("image_grid_thw", np.zeros((0, 3))).tolist(),
                   "video_grid_thw": batches[name].get("video_grid_thw", np.zeros((0, 3))).tolist(),
                   "trained_tokens": int((batches[name]["labels"][:, 1:] != -100).sum())}
            for name, case in CASES.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="tests/golden directory")
    args = parser.parse_args()

    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    fixtures = args.out / "fixtures"
    if fixtures.exists():
        shutil.rmtree(fixtures)
    fixtures.mkdir(parents=True)

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
    }
    batches = {name: build_batch(case) for name, case in CASES.items()}
    manifest = {
        "generator": "tests/golden/generate.py",
        "versions": versions,
        "settings": {
            "dtype": "float32", "attn_implementation": "eager", "experts_implementation": "eager (MoE models)",
            "expert_layout": "grads.safetensors, and model.safetensors of the models whose expert_layout is "
            "published, hold the experts as the published checkpoints do: gate_up_proj [E, H, 2I], down_proj "
            "[E, I, H]; HF 5.24 holds them transposed in memory and its save_pretrained writes that in-memory layout, "
            "so the generator transposes them itself. Models whose expert_layout is transformers keep the "
            "model.safetensors that save_pretrained wrote: gate_up_proj [E, 2I, H], down_proj [E, H, I]",
            "torch_threads": TORCH_THREADS, "min_router_logit_gap": MIN_ROUTER_LOGIT_GAP,
            "tokens": {"vocab": VOCAB, "pad": PAD, "im_start": IM_START, "im_end": IM_END,
                       "vision_start": VISION_START, "vision_end": VISION_END, "image_pad": IMAGE_PAD,
                       "video_pad": VIDEO_PAD, "roles": ROLE_TOKENS, "newline": NEWLINE,
                       "timestamp": {"open": TS_OPEN, "digit0": TS_DIGIT0, "dot": TS_DOT, "close": TS_CLOSE},
                       "text_range": list(TEXT_TOKENS)},
        },
        "cases": describe_cases(batches),
        "models": {},
    }

    largest = None
    for name, spec in MODELS.items():
        model, manifest["models"][name] = write_model(name, spec, batches, fixtures / name)
        if largest is None or model.num_parameters() > largest[1].num_parameters():
            largest = (name, model)
    (fixtures / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    name, model = largest
    tokens = {case: int(batches[case]["attention_mask"].sum()) for case in MODELS[name]["cases"]}
    case = max(tokens, key=tokens.get)
    batch = batches[case]
    timing = {
        "what": "HF transformers fp32 forward (with labels) + backward on the CPU, eager attention and experts",
        "model": name, "case": case, "num_parameters": model.num_parameters(), "tokens": tokens[case],
        "vision_patches": sum(int(batch[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in batch),
        **time_fwd_bwd(model, batch, TIMING_THREADS),
        "one_thread": time_fwd_bwd(model, batch, 1),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine inflates the times
        "versions": versions,
    }
    (args.out / "hf_timing.json").write_text(json.dumps(timing, indent=2) + "\n")

    (args.out / "hf_param_counts.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "counted_on": "meta device, PreTrainedModel.num_parameters()",
         "flavors": param_counts()}, indent=2) + "\n")

    total = dir_size(fixtures)
    print(f"fixtures: {total / 1e6:.2f} MB in {fixtures}")
    assert total < FIXTURE_BUDGET_BYTES, f"fixtures are {total} bytes, over the {FIXTURE_BUDGET_BYTES} budget"


if __name__ == "__main__":
    main()
