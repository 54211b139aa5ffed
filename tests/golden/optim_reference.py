"""Usage: build/golden-venv/bin/python tests/golden/optim_reference.py  (writes tests/golden/optim_reference.json)

The reference for tests/core/test_optim.cpp: torch.optim.AdamW (single-tensor path, foreach=False,
fused=False) for 5 steps on 3 small fp32 tensors in 3 parameter groups (weight decay; no weight decay;
weight decay with half the learning rate), with fixed gradients per step clipped by
torch.nn.utils.clip_grad_norm_ and the learning rate driven by LambdaLR with q3vl's warmup + cosine
schedule. Also LambdaLR's values of several schedules. Deterministic: rerunning gives the same file.
"""

import json
import math
import pathlib

import torch

OUT = pathlib.Path(__file__).with_name("optim_reference.json")

BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-8, 0.1
MAX_NORM = 2.0
STEPS = 5
# Gradient scale per step: steps 0, 2 and 3 are clipped, steps 1 and 4 are not.
GRAD_FACTORS = [3.0, 0.2, 1.0, 5.0, 0.05]
SCHEDULE = {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "total_steps": 5, "decay": "cosine"}
TENSORS = [  # name, shape, decay, lr_scale
    ("decayed", [3, 5], True, 1.0),
    ("no_decay", [7], False, 1.0),
    ("half_lr", [2, 3, 4], True, 0.5),
]
SCHEDULE_CASES = [
    {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 3, "total_steps": 10, "decay": "cosine"},
    {"lr": 2e-4, "min_lr": 0.0, "warmup_steps": 0, "total_steps": 8, "decay": "linear"},
    {"lr": 5e-4, "min_lr": 1e-4, "warmup_steps": 4, "total_steps": 6, "decay": "constant"},
    {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 5, "total_steps": 3, "decay": "cosine"},
]


def schedule_at(s, step):
    """LrSchedule::at in the same operation order as core/optim/lr_schedule.cpp."""
    lr, min_lr, warmup, total = s["lr"], s["min_lr"], s["warmup_steps"], s["total_steps"]
    if step < warmup:
        return lr * float(step + 1) / float(warmup)
    if s["decay"] == "constant":
        return lr
    if step >= total:
        return min_lr
    progress = float(step - warmup) / float(total - warmup)
    if s["decay"] == "cosine":
        return min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
    return lr + (min_lr - lr) * progress


def lambda_lr(optimizer, s):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_at(s, step) / s["lr"])


def values(t):
    return t.detach().reshape(-1).tolist()


def adamw_run():
    gen = torch.Generator().manual_seed(20240611)
    params = [torch.randn(shape, generator=gen) for _, shape, _, _ in TENSORS]
    grads = [[torch.randn(shape, generator=gen) * f for _, shape, _, _ in TENSORS] for f in GRAD_FACTORS]
    for step_grads in grads:  # tiny gradients where eps matters
        step_grads[1][:3] *= 1e-8
    init = [p.clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    groups = [
        {"params": [p], "lr": SCHEDULE["lr"] * scale, "weight_decay": WEIGHT_DECAY if decay else 0.0}
        for p, (_, _, decay, scale) in zip(params, TENSORS)
    ]
    opt = torch.optim.AdamW(groups, lr=SCHEDULE["lr"], betas=(BETA1, BETA2), eps=EPS, foreach=False, fused=False)
    sched = lambda_lr(opt, SCHEDULE)
    steps, after = [], [[] for _ in params]
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        total_norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=False)
        coef = torch.clamp(MAX_NORM / (total_norm + 1e-6), max=1.0)
        steps.append({"lr": sched.get_last_lr()[0], "total_norm": total_norm.item(), "clip_coef": coef.item()})
        opt.step()
        sched.step()
        for i, p in enumerate(params):
            after[i].append(values(p))
    tensors = []
    for i, (name, shape, decay, scale) in enumerate(TENSORS):
        state = opt.state[params[i]]
        tensors.append({
            "name": name, "shape": shape, "decay": decay, "lr_scale": scale, "init": values(init[i]),
            "grads": [values(grads[s][i]) for s in range(STEPS)], "params_after_step": after[i],
            "exp_avg": values(state["exp_avg"]), "exp_avg_sq": values(state["exp_avg_sq"]),
        })
    return {"steps": steps, "tensors": tensors}


def schedule_values(s):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=s["lr"])
    sched = lambda_lr(opt, s)
    lrs = []
    for _ in range(s["total_steps"] + 3):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return dict(s, values=lrs)


def dump(obj, indent=0):
    """JSON with every list of numbers on one line (floats as shortest round-trip repr, exact for fp32)."""
    pad = " " * indent
    if isinstance(obj, dict):
        items = [f'{pad} {json.dumps(k)}: {dump(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        return pad + "[\n" + ",\n".join(dump(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj)


def main():
    torch.set_num_threads(1)
    reference = {
        "torch_version": torch.__version__,
        "options": {"beta1": BETA1, "beta2": BETA2, "eps": EPS, "weight_decay": WEIGHT_DECAY, "max_norm": MAX_NORM},
        "schedule": SCHEDULE,
        **adamw_run(),
        "schedules": [schedule_values(s) for s in SCHEDULE_CASES],
    }
    OUT.write_text(dump(reference) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
