"""Checks the committed golden fixtures without trusting generate.py.

For every model and case listed in fixtures/manifest.json:
  - the batch is well formed (pad-token counts match the grids, pixel rows match the grids, labels ignore padding);
  - position_ids equal an implementation of get_rope_index written from SPEC.md (scanning vision_start spans,
    not HF's mm_token_type_ids);
  - loss equals a float64 NumPy cross-entropy of the stored logits, aux_loss a float64 NumPy load-balancing loss
    of the stored router logits (padding excluded), total_loss = loss + coef * aux_loss;
  - the checkpoint reloaded with from_pretrained reproduces logits, losses and gradients exactly, with the expert
    gradients mapped to the published layout by SPEC's rule (published = memory transposed in dims 1 and 2);
and, for one case per model, central finite differences of CE + coef * aux in float64 agree with the stored
gradient of every checkpoint tensor (at its largest entry and along a random direction), perturbing the
parameter through its PUBLISHED layout (the layout of grads.safetensors).
Usage: python verify.py [--fixtures DIR]
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import safetensors.torch
import torch
import transformers
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

CLASSES = {cls.__name__: cls for cls in (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)}
FD_CASE = "padded_batch2"  # image and video, padding excluded from CE and aux (else a model's only case)
FD_STEP = 1e-4
# Central differences of the float64 model (float32 islands removed, see exact_float64) agree with the float32
# autograd gradients to ~1e-6 relative; the tolerance leaves 100x room. A layout or loss-definition error is O(|g|).
FD_RTOL = 1e-4
FD_ATOL = 1e-6

def read_h5(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def is_expert(key):
    return key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj")


def to_disk(key, tensor):
    return tensor.transpose(1, 2) if is_expert(key) else tensor


def check_batch(batch, cfg):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == np.int64
    assert (labels[mask == 0] == -100).all()
    trained = labels != -100
    assert (labels[trained] == ids[trained]).all() and trained.any()
    for kind, token in (("image", cfg["image_token_id"]), ("video", cfg["video_token_id"])):
        grid_key = f"{kind}_grid_thw"
        pixels = batch.get("pixel_values" if kind == "image" else "pixel_values_videos")
        if grid_key not in batch:
            assert pixels is None and not (ids == token).any()
            continue
        grid = batch[grid_key]
        assert pixels.dtype == np.float32 and pixels.shape == (grid.prod(1).sum(), 1536)
        assert (ids == token).sum() == grid.prod(1).sum() // 4
    types = np.where(ids == cfg["image_token_id"], 1, np.where(ids == cfg["video_token_id"], 2, 0))
    assert (batch["mm_token_type_ids"] == types).all()


def spec_positions(batch, cfg):
    """SPEC.md: text runs advance by one on all rows; a visual span (an image, or one temporal patch of a video)
    starting at s with merged grid (h', w') has T = s, H = s + row, W = s + col and the next token starts at
    s + max(h', w'). Items are consumed in sequence order over the whole batch. Padding keeps position 0."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = [tuple(g) for g in batch.get("image_grid_thw", [])]
    videos = [(1, h, w) for t, h, w in batch.get("video_grid_thw", []) for _ in range(t)]
    pads = {cfg["image_token_id"]: images, cfg["video_token_id"]: videos}
    pos = np.zeros((3, *ids.shape), np.int64)
    for b in range(ids.shape[0]):
        valid = np.flatnonzero(mask[b])
        assert (valid == np.arange(len(valid))).all(), "fixtures are right-padded"
        cur, i = 0, 0
        while i < len(valid):
            token = ids[b, i]
            if token in pads:
                _, h, w = pads[token].pop(0)
                hm, wm = h // 2, w // 2
                span = slice(i, i + hm * wm)
                assert (ids[b, span] == token).all() and ids[b, i - 1] == cfg["vision_start_token_id"]
                rows, cols = np.divmod(np.arange(hm * wm), wm)
                pos[0, b, span], pos[1, b, span], pos[2, b, span] = cur, cur + rows, cur + cols
                cur += max(hm, wm)
                i += hm * wm
            else:
                pos[:, b, i] = cur
                cur += 1
                i += 1
    assert not images and not videos
    return pos


def spec_ce(logits, labels):
    logits = logits[:, :-1].astype(np.float64).reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    logits, target = logits[keep], target[keep]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -logp[np.arange(len(target)), target].mean()


def spec_aux(router_logits, mask, num_experts, k):
    """SPEC.md: per layer softmax and top-k; f_i = routed count / tokens, P_i = mean probability, both over the
    non-padding tokens pooled over MoE layers; aux = E * sum_i f_i P_i."""
    valid = mask.reshape(-1).astype(bool)
    counts = np.zeros(num_experts)
    probs = np.zeros(num_experts)
    rows = 0
    for logits in router_logits.astype(np.float64):
        logits = logits[valid]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
        counts += np.bincount(top.reshape(-1), minlength=num_experts)
        probs += p.sum(0)
        rows += len(logits)
    return num_experts * np.sum(counts / rows * probs / rows)


def hf_inputs(batch, moe):
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"].to(torch.int32)
    if moe:
        inputs["output_router_logits"] = True
    return inputs


def load(model_dir, cls, dtype):
    kwargs = {"attn_implementation": "eager", "dtype": dtype}
    if cls is Qwen3VLMoeForConditionalGeneration:
        kwargs["experts_implementation"] = "eager"
    return cls.from_pretrained(model_dir, **kwargs)


def num_experts(text):
    # transformers 5 writes num_local_experts (an attribute_map alias); the published 4.57-era files num_experts.
    return text.get("num_experts", text.get("num_local_experts"))


def check_checkpoint(model, disk, cfg, expert_layout):
    """model.safetensors against the loaded parameters: experts in the published layout (SPEC's rule) or, for
    expert_layout "transformers", as transformers holds them in memory (what its save_pretrained writes)."""
    text = cfg["text_config"]
    params = dict(model.named_parameters(remove_duplicate=False))
    published = expert_layout != "transformers"
    for key, tensor in disk.items():
        assert tensor.dtype == torch.float32, key
        mem = params[key].detach()
        assert torch.equal(to_disk(key, mem) if published else mem, tensor), key
        e, h, i = num_experts(text), text["hidden_size"], text["moe_intermediate_size"]
        if key.endswith("mlp.experts.gate_up_proj"):
            assert tensor.shape == ((e, h, 2 * i) if published else (e, 2 * i, h)), key
        if key.endswith("mlp.experts.down_proj"):
            assert tensor.shape == ((e, i, h) if published else (e, h, i)), key
    assert ("lm_head.weight" in disk) != cfg["tie_word_embeddings"]
    assert set(params) - set(disk) <= {"lm_head.weight"}


def check_rerun(model, batch, expected, grads):
    moe = isinstance(model, Qwen3VLMoeForConditionalGeneration)
    model.zero_grad(set_to_none=True)
    out = model(**hf_inputs(batch, moe))
    out.loss.backward()
    assert np.array_equal(out.logits.detach().numpy(), expected["logits"])
    assert np.float32(out.loss.item()) == expected["total_loss"]
    if moe:
        assert np.float32(out.aux_loss.item()) == expected["aux_loss"]
        assert np.array_equal(torch.stack(out.router_logits).detach().numpy(), expected["router_logits"])
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(grads) == {k for k in params if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    for key, stored in grads.items():
        grad = params[key].grad
        mine = torch.zeros_like(stored) if grad is None else to_disk(key, grad)
        assert torch.equal(mine, stored), (key, (mine - stored).abs().max().item())


def exact_float64():
    """HF computes some steps in float32 whatever the model dtype (softmax dtype=float32, RMSNorm upcast, vision
    rotary upcast); on a float64 model they quantize the loss and ruin finite differences. Within this context
    they run in the input's dtype, which changes the float32 model's function only by float32 rounding."""
    import transformers.models.qwen3_vl.modeling_qwen3_vl as dense_module
    import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe as moe_module

    softmax = torch.nn.functional.softmax

    def softmax_keep_dtype(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    def rmsnorm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def vision_rotary(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        rotate = moe_module.rotate_half
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(torch.nn.functional, "softmax", softmax_keep_dtype))
    for module, norm in ((dense_module, "Qwen3VLTextRMSNorm"), (moe_module, "Qwen3VLMoeTextRMSNorm")):
        stack.enter_context(mock.patch.object(getattr(module, norm), "forward", rmsnorm))
        stack.enter_context(mock.patch.object(module, "apply_rotary_pos_emb_vision", vision_rotary))
    return stack


def total_loss64(model, inputs, batch):
    """SPEC's CE + coef * aux in float64 (HF's own loss functions compute in float32)."""
    out = model(**inputs)
    labels = torch.from_numpy(batch["labels"])
    vocab = out.logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    if isinstance(model, Qwen3VLMoeForConditionalGeneration):
        text = model.config.text_config
        mask = torch.from_numpy(batch["attention_mask"]).reshape(-1).double()
        counts = torch.zeros(text.num_experts, dtype=torch.float64)
        probs = torch.zeros(text.num_experts, dtype=torch.float64)
        for logits in out.router_logits:
            p = torch.softmax(logits, -1)
            top = torch.topk(p, text.num_experts_per_tok, -1).indices
            counts += torch.zeros_like(counts).scatter_add_(0, top.reshape(-1),
                                                            mask.repeat_interleave(text.num_experts_per_tok))
            probs += (p * mask[:, None]).sum(0)
        rows = mask.sum() * len(out.router_logits)
        loss = loss + text.router_aux_loss_coef * text.num_experts * torch.sum(counts / rows * probs / rows)
    return loss.item()


def fd_check(model_dir, cls, batch, grads):
    """For every checkpoint tensor, perturbs the ON-DISK layout view of the parameter at its largest-gradient entry
    and along one random unit direction, and compares central differences with the stored gradient."""
    model = load(model_dir, cls, torch.float64)
    inputs = hf_inputs(batch, cls is Qwen3VLMoeForConditionalGeneration)
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad(), exact_float64():
        for key, grad in grads.items():
            grad = grad.double()
            disk_view = to_disk(key, params[key].data)  # a view: writing it writes the parameter
            point = torch.zeros_like(grad)
            point.view(-1)[grad.abs().argmax()] = 1.0
            direction = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
            for d in (point, direction / direction.norm()):
                original = disk_view.clone()
                losses = []
                for step in (FD_STEP, -FD_STEP):
                    disk_view.copy_(original + step * d)
                    losses.append(total_loss64(model, inputs, batch))
                disk_view.copy_(original)
                fd = (losses[0] - losses[1]) / (2 * FD_STEP)
                stored = torch.sum(grad * d).item()
                bound = FD_ATOL + FD_RTOL * abs(stored)
                assert abs(fd - stored) <= bound, (key, fd, stored)
                worst = max(worst, abs(fd - stored) / bound)
    return worst

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parent / "fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as generate.py: bit-identical re-runs need the same thread count
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    manifest = json.loads((args.fixtures / "manifest.json").read_text())
    checked = 0
    for model_name, info in manifest["models"].items():
        model_dir = args.fixtures / model_name
        cfg = json.loads((model_dir / "config.json").read_text())
        cls = CLASSES[cfg["architectures"][0]]
        model = load(model_dir, cls, torch.float32)
        check_checkpoint(model, safetensors.torch.load_file(model_dir / "model.safetensors"), cfg,
                         info.get("expert_layout"))
        text = cfg["text_config"]
        for case in info["cases"]:
            case_dir = model_dir / case
            batch = read_h5(case_dir / "batch.h5")
            expected = read_h5(case_dir / "expected.h5")
            grads = safetensors.torch.load_file(case_dir / "grads.safetensors")
            check_batch(batch, cfg)
            assert np.array_equal(spec_positions(batch, cfg), expected["position_ids"]), (model_name, case)
            ce = spec_ce(expected["logits"], batch["labels"])
            assert abs(ce - expected["loss"]) <= 1e-5 * ce, (model_name, case, ce, expected["loss"])
            coef = expected["router_aux_loss_coef"]
            if "router_logits" in expected:
                aux = spec_aux(expected["router_logits"], batch["attention_mask"], num_experts(text),
                               text["num_experts_per_tok"])
                assert abs(aux - expected["aux_loss"]) <= 1e-5 * aux, (model_name, case, aux, expected["aux_loss"])
            else:
                assert expected["aux_loss"] == 0 and coef == 0
            assert abs(expected["loss"] + coef * expected["aux_loss"] - expected["total_loss"]) <= 1e-6
            check_rerun(model, batch, expected, grads)
            checked += 1
            print(f"{model_name}/{case}: ok")
        fd_case = FD_CASE if FD_CASE in info["cases"] else info["cases"][0]
        worst = fd_check(model_dir, cls, read_h5(model_dir / fd_case / "batch.h5"),
                         safetensors.torch.load_file(model_dir / fd_case / "grads.safetensors"))
        print(f"{model_name}/{fd_case}: finite differences ok (worst error {worst:.2f} of tolerance)")
    print(f"{checked} passed, 0 failed")


if __name__ == "__main__":
    sys.exit(main())
