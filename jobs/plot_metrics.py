#!/usr/bin/env python3
"""Plots one or more q3vl training runs' metrics.jsonl into one PNG.

Usage: python3 jobs/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [...] --out PNG

Each argument is a run folder (the trainer's output_dir, holding metrics.jsonl) or a metrics.jsonl file. The
PNG has one panel per quantity over optimizer steps: loss (and its cross-entropy part), aux loss, grad norm,
learning rate, tokens/s, the step's time by phase (data wait, forward, backward, communication, optimizer), the
expert-load imbalance per MoE layer (max/mean tokens per expert, 1 = balanced)
from the `expert_load` records the trainer writes every `logging.expert_stats_every` steps, and the expert health
per MoE layer (coefficient of variation of the loads, router entropy, dead experts) from the `expert_health`
records of every `logging.expert_health_every` steps. Several runs overlay,
labelled with their folder names. Next to the PNG goes PNG.json, listing the panels' titles and the runs; the
titles are also in the PNG's metadata ("Description").

Records read (app/trainer_log.cpp): "step" (loss, ce_loss, aux_loss, grad_norm, lr, tokens_per_s, skipped, data_s,
forward_s, backward_s, comm_s, optimizer_s) and
"expert_load" (layers: moe_layer, min, max, mean, std), "expert_health" (layers: moe_layer, cv, max_over_mean,
dead_experts, router_entropy). Others ("start", "memory", "checkpoint", ...) are ignored.
A resumed run repeats the steps after its checkpoint: the last record of a step wins.

matplotlib comes from Debian's python3-matplotlib (jobs/setup.sh installs it): run this with /usr/bin/python3.
This script is outside the training path; nothing in q3vl needs it. Errors are one line on stderr, exit 1.
"""

import argparse
import json
import os
import sys

DEBIAN_PYTHON = "/usr/bin/python3"


def fail(message):
    print(f"plot_metrics: {message}", file=sys.stderr)
    sys.exit(1)


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        # Another python3 first on PATH (pyenv, a venv) often lacks the Debian package: use Debian's.
        if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PYTHON) and os.access(DEBIAN_PYTHON, os.X_OK) \
                and not os.environ.get("Q3VL_PLOT_REEXEC"):
            os.environ["Q3VL_PLOT_REEXEC"] = "1"
            os.execv(DEBIAN_PYTHON, [DEBIAN_PYTHON] + sys.argv)
        fail(f"matplotlib is missing for {sys.executable}: install python3-matplotlib (jobs/setup.sh does) "
             f"and run this with {DEBIAN_PYTHON}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def metrics_file(arg):
    if os.path.isdir(arg):
        path = os.path.join(arg, "metrics.jsonl")
        if not os.path.isfile(path):
            fail(f"{arg} holds no metrics.jsonl (not a q3vl run folder?)")
        return path
    if not os.path.exists(arg):
        fail(f"no such file or folder: {arg}")
    return arg


def read_run(path):
    """Step, expert-load and expert-health records of one metrics.jsonl, each keyed by step (the last record of a
    step wins)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    lines = text.split("\n")
    steps, loads, health = {}, {}, {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line of a run still writing it
                continue
            fail(f"{path}:{number}: not a JSON record")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if record.get("event") == "step":
            steps[record["step"]] = record
        elif record.get("event") == "expert_load" and isinstance(record.get("layers"), list):
            loads[record["step"]] = record["layers"]
        elif record.get("event") == "expert_health" and isinstance(record.get("layers"), list):
            health[record["step"]] = record["layers"]
    if not steps:
        fail(f"{path} has no step records (\"event\": \"step\"): did the run train a step?")
    return steps, loads, health


def run_labels(paths):
    """Each run's folder name (a file not named metrics.jsonl: its own name), with more of its path where two runs
    would read the same."""
    names = []
    for p in paths:
        full = os.path.abspath(p)
        names.append(os.path.dirname(full) if os.path.isfile(full) and os.path.basename(full) == "metrics.jsonl"
                     else full)
    for depth in range(1, 9):
        labels = [os.path.join(*n.strip(os.sep).split(os.sep)[-depth:]) if n.strip(os.sep) else n for n in names]
        if len(set(labels)) == len(labels):
            break
    return labels


def series(steps, key):
    xs, ys = [], []
    for step in sorted(steps):
        value = steps[step].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(step)
            ys.append(value)
    return xs, ys


def by_layer(records, value):
    """moe_layer -> (steps, value(layer record)) over per-layer records; value returns None to skip a record."""
    out = {}
    for step in sorted(records):
        for layer in records[step]:
            try:
                index, y = int(layer["moe_layer"]), value(layer)
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                continue
            if y is not None:
                xs, ys = out.setdefault(index, ([], []))
                xs.append(step)
                ys.append(y)
    return out


PHASES = [("data_s", "data"), ("forward_s", "forward"), ("backward_s", "backward"), ("comm_s", "comm"),
          ("optimizer_s", "optimizer")]


def draw_phases(ax, runs, labels, styles, colors):
    """Seconds per step in each phase: a color per phase, a line style per run. Returns the panel's title."""
    title = "step time by phase (s): data, forward, backward, comm, optimizer"
    drawn = False
    for r, (steps, _, _) in enumerate(runs):
        for p, (key, name) in enumerate(PHASES):
            xs, ys = series(steps, key)
            if not xs:
                continue
            ax.plot(xs, ys, styles[r % len(styles)], color=colors[p % len(colors)], linewidth=1.3,
                    marker="o" if len(xs) < 20 else None, markersize=3,
                    label=name if len(runs) == 1 else f"{name} ({labels[r]})")
            drawn = True
    if not drawn:
        title += ": no 'forward_s' field in the step records (a run before the phase split)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return title


def imbalance(layer):
    mean = float(layer["mean"])
    return float(layer["max"]) / mean if mean > 0 else None


def draw_per_layer(plt, fig, ax, per_run, labels, styles, all_steps, reference, title, empty_title):
    """One quantity per MoE layer over steps: one color per layer, one line style and marker per run. Returns the
    panel's title (empty_title when no run recorded it)."""
    from matplotlib.lines import Line2D
    layers = sorted({layer for run in per_run for layer in run})
    many = len(layers) > 10
    cmap = plt.get_cmap("viridis" if many else "tab10")
    color = {layer: cmap(i / max(1, len(layers) - 1)) if many else cmap(i % 10) for i, layer in enumerate(layers)}
    markers = ["o", "s", "^", "D", "v", "P"]
    for r, by_layer_run in enumerate(per_run):
        for layer, (xs, ys) in sorted(by_layer_run.items()):
            ax.plot(xs, ys, styles[r % len(styles)], color=color[layer], marker=markers[r % len(markers)],
                    markersize=4 if len(xs) > 1 else 7, linewidth=1.3, alpha=0.85,
                    fillstyle="full" if r == 0 else "none")  # runs that coincide stay visible
    without = [labels[r] for r, by_layer_run in enumerate(per_run) if not by_layer_run]
    if not layers:
        title = empty_title
        ax.text(0.5, 0.5, "not recorded in these runs", ha="center", va="center", transform=ax.transAxes)
    else:
        if without:
            title += f"; none recorded in {', '.join(without)}"
        if reference is not None:
            ax.axhline(reference, color="gray", linewidth=0.8, linestyle=":")
        handles = [] if many else [Line2D([], [], color=color[layer], label=f"layer {layer}") for layer in layers]
        if len(per_run) > 1:
            handles += [Line2D([], [], color="black", linestyle=styles[r % len(styles)], marker=markers[r % len(markers)],
                               fillstyle="full" if r == 0 else "none", label=labels[r])
                        for r in range(len(per_run)) if per_run[r]]
        if handles:
            ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 6 else 1)
        if many:
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], layers[-1]))
            fig.colorbar(sm, ax=ax, label="MoE layer")
    if min(all_steps) < max(all_steps):  # the same step axis as the other panels
        pad = 0.05 * (max(all_steps) - min(all_steps))
        ax.set_xlim(min(all_steps) - pad, max(all_steps) + pad)
    ax.set_title(title, fontsize=10 if len(title) > 60 else None)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return title


def save_png(fig, path, dpi, metadata):
    """The figure as a 256-color PNG (line plots look the same at a third of the size), with the metadata."""
    try:
        from PIL import Image, PngImagePlugin
        quantize = dict(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    except (ImportError, AttributeError):  # no Pillow, or one older than 9.1: matplotlib's full-color PNG
        fig.savefig(path, dpi=dpi, metadata=metadata)
        return
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(**quantize)
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    image.save(path, format="PNG", optimize=True, pnginfo=info)


def main():
    parser = argparse.ArgumentParser(
        prog="plot_metrics.py", description="Plot q3vl runs' metrics.jsonl (loss, aux loss, grad norm, learning "
        "rate, tokens/s, expert-load imbalance per layer) into one PNG, with a JSON sidecar PNG.json.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_JSONL")
    parser.add_argument("--out", required=True, metavar="PNG", help="the picture to write (and PNG.json beside it)")
    parser.add_argument("--title", help="a heading over the panels (default: the runs' names)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    if not args.out.lower().endswith(".png"):
        fail(f"--out must name a .png file, got '{args.out}'")

    paths = [metrics_file(a) for a in args.runs]
    runs = [read_run(p) for p in paths]
    labels = run_labels(args.runs)
    plt = import_pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]

    panels = [
        ("loss", "loss (dashed: cross-entropy part)", [("loss", "-"), ("ce_loss", "--")], False),
        ("aux_loss", "aux loss (router load balancing)", [("aux_loss", "-")], False),
        ("grad_norm", "grad norm (before clipping)", [("grad_norm", "-")], True),
        ("lr", "learning rate", [("lr", "-")], False),
        ("tokens_per_s", "tokens/s", [("tokens_per_s", "-")], False),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(18, 12), constrained_layout=True)
    axes = axes.ravel()
    titles = []
    for ax, (name, title, keys, log) in zip(axes, panels):
        drawn = False
        for r, (steps, _, _) in enumerate(runs):
            for key, style in keys:
                xs, ys = series(steps, key)
                if not xs:
                    continue
                ax.plot(xs, ys, style, color=colors[r % len(colors)], marker="o" if len(xs) < 20 else None,
                        markersize=3, linewidth=1.3, label=labels[r] if key == keys[0][0] else None)
                drawn = True
        if not drawn:
            title += f": no '{keys[0][0]}' field in the step records"
        else:
            values = [y for steps, _, _ in runs for y in series(steps, keys[0][0])[1]]
            if log and min(values) > 0 and max(values) > 20 * min(values):  # spans decades: log scale
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5), useOffset=False)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        titles.append(title)
    titles.append(draw_phases(axes[len(panels)], runs, labels, styles, colors))

    all_steps = [step for steps, _, _ in runs for step in steps]
    per_layer_panels = [
        ([by_layer(loads, imbalance) for _, loads, _ in runs], 1.0,
         "expert-load imbalance per MoE layer (max/mean tokens per expert)",
         "expert-load imbalance: none recorded (no expert_load records; set logging.expert_stats_every)"),
        ([by_layer(health, lambda l: float(l["cv"])) for _, _, health in runs], 0.0,
         "expert health: coefficient of variation of the loads per MoE layer",
         "expert health: none recorded (no expert_health records; set logging.expert_health_every)"),
        ([by_layer(health, lambda l: float(l["router_entropy"])) for _, _, health in runs], None,
         "router entropy per MoE layer (nats)",
         "router entropy: none recorded (no expert_health records; set logging.expert_health_every)"),
    ]
    for i, (per_run, reference, title, empty_title) in enumerate(per_layer_panels):
        if i == 2:
            dead = max((int(l.get("dead_experts", 0)) for _, _, health in runs for layers in health.values()
                        for l in layers if isinstance(l, dict)), default=0)
            title += f", at most {dead} dead experts"
        titles.append(draw_per_layer(plt, fig, axes[len(panels) + 1 + i], per_run, labels, styles, all_steps, reference,
                                     title, empty_title))

    fig.suptitle(args.title or "q3vl training: " + ", ".join(labels))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    description = "panels: " + "; ".join(titles) + ". runs: " + ", ".join(labels)
    metadata = {"Title": "q3vl training metrics", "Description": description, "Software": "q3vl jobs/plot_metrics.py"}
    try:
        save_png(fig, args.out, args.dpi, metadata)
    except OSError as e:
        fail(f"cannot write {args.out}: {e.strerror}")
    sidecar = {
        "png": os.path.basename(args.out),
        "panels": titles,
        "runs": [{"label": labels[r], "metrics": os.path.abspath(paths[r]), "step_records": len(steps),
                  "first_step": min(steps), "last_step": max(steps), "expert_load_records": len(loads),
                  "expert_health_records": len(health)}
                 for r, (steps, loads, health) in enumerate(runs)],
    }
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    print(f"plot_metrics: {args.out} ({len(titles)} panels, {len(runs)} run{'s' if len(runs) > 1 else ''}) "
          f"and {args.out}.json")


if __name__ == "__main__":
    main()
