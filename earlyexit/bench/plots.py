"""``earlyexit bench plot``: figures from benchmark JSON rows (plots never measure).

- ``pareto.png``: quality (ROUGE-L against full depth) vs speedup, one curve per strategy and
  model, from ``early_exit.json``; the upper envelope is the frontier.
- ``batched_exit.png``: tokens/s by batch size for full depth, naive batched exit and ours.
- ``decode.png``: our decoder vs transformers (and the F.linear ablation) by batch size.

Needs matplotlib (``pip install 'earlyexit[plot]'``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from earlyexit.errors import EarlyExitError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EarlyExitError("plots need matplotlib: pip install 'earlyexit[plot]'") from None
    return plt


def save(fig, out: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure; every figure here and in the demo report."""
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _plt().close(fig)
    return out


def pareto(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    curves = defaultdict(list)
    for r in rows:
        kind = r["strategy"]
        if r["options"].get("adaptive"):
            kind = "free (adaptive)"
        elif r["options"].get("measure") == "classifier":
            kind = "free (classifier)"
        curves[(r["model"], kind)].append((r["speedup"], r["rouge_l"]))
    for (model, kind), pts in sorted(curves.items()):
        xs, ys = zip(*pts)  # in sweep order (threshold or draft length), not re-sorted
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if len(pts) > 1 else "",
            label=f"{kind} ({model}-trained exits)",
        )
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speedup over full depth (same run, batch 1)")
    ax.set_ylabel("ROUGE-L vs full-depth greedy output")
    ax.set_title("Early exit: quality vs speed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, out)


def batched(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by = defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["batch_size"]] = r["tokens_per_s"]
    sizes = sorted({r["batch_size"] for r in rows})
    width = 0.8 / max(len(by), 1)
    for i, (variant, vals) in enumerate(sorted(by.items())):
        ax.bar(
            [j + i * width for j in range(len(sizes))],
            [vals.get(s, 0) for s in sizes],
            width,
            label=variant,
        )
    ax.set_xticks(
        [j + width * (len(by) - 1) / 2 for j in range(len(sizes))], [str(s) for s in sizes]
    )
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title("Early exit under batching")
    ax.legend()
    return save(fig, out)


def decode(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    impls = [r for r in rows if r["impl"] != "summary"]
    names = sorted({r["impl"] for r in impls})
    sizes = sorted({r["batch_size"] for r in impls})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = {r["batch_size"]: r["tokens_per_s"] for r in impls if r["impl"] == name}
        ax.bar(
            [j + i * width for j in range(len(sizes))],
            [vals.get(s, 0) for s in sizes],
            width,
            label=name,
        )
    ax.set_xticks(
        [j + width * (len(names) - 1) / 2 for j in range(len(sizes))], [str(s) for s in sizes]
    )
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title("Full-depth decode")
    ax.legend()
    return save(fig, out)


def depthwise(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [r["label"] for r in rows]
    vals = [r["x_vanilla_static"] for r in rows]
    ax.barh(range(len(rows)), vals, color=["#888" if "vanilla" in x else "#2a7" for x in labels])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.5)
    for i, r in enumerate(rows):
        ax.text(vals[i], i, f" {vals[i]:.2f}x  (NLL {r['val_nll']:.3f})", va="center", fontsize=7)
    ax.set_xlabel("throughput / vanilla with static batching (same run)")
    ax.set_title("Serving a request stream (max batch 32)")
    return save(fig, out)


def plot_all(results: str | Path = "results", out_dir: str | Path = "results/plots") -> list[Path]:
    """Every figure whose rows exist in ``results``."""
    results, out_dir = Path(results), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fn, fig in (
        ("early_exit.json", pareto, "pareto.png"),
        ("batched_exit.json", batched, "batched_exit.png"),
        ("decode.json", decode, "decode.png"),
        ("depthwise.json", depthwise, "depthwise.png"),
    ):
        path = results / name
        if path.is_file():
            made.append(fn(json.loads(path.read_text()), out_dir / fig))
    if not made:
        raise EarlyExitError(f"{results}: no benchmark rows to plot (run earlyexit bench ...)")
    return made
