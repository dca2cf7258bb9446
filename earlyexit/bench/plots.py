"""``earlyexit bench plot``: figures from benchmark JSON rows (plots never measure).

- ``pareto.png``: quality (ROUGE-L against full depth) vs speedup, one curve per strategy and
  model, from ``early_exit.json``; the upper envelope is the frontier. The demo's report
  draws the same chart through the same function (:func:`quality_vs_speed`).
- ``batched_exit.png``: tokens/s by batch size for full depth, naive batched exit and ours.
- ``decode.png``: our decoder vs transformers (and the F.linear ablation) by batch size.
- ``depthwise_synthetic.png``: the synthetic-exit map, x vanilla continuous batching.
- ``depthwise_calls.png``: a depth-wise block call over a plain one, by rows and context.
- ``real_model_pareto.png`` / ``batched_exit_demo.png``: the same figures for SmolLM2 and
  for the demo model with the batch fallback; ``batched_exit_vocab.png`` adds the pruned
  exit head; ``batched_exit_sync.png`` rows that exit together against per-row exits.
- ``depthwise_smollm2.png``: the converted SmolLM2 with its loop exit, served (speed and
  ROUGE-L per policy and max batch).
- ``depthwise_synthetic_nocatchup.png``: the synthetic map for exits that leave no catch-up
  (``ExitMode.deep_kv`` propagate / skip), with and without a pruned exit head.
- ``depthwise_synthetic_kernel.png`` / ``depthwise_smollm2_kernel.png``: the SmolLM-shape
  map and the SmolLM2 serving run again, with decode attention on the compiled kernel.

Needs matplotlib (``pip install 'earlyexit[plot]'``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

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


def axis_limit(values: list[float], k: float = 1.5, min_points: int = 5) -> float | None:
    """The upper axis limit that keeps one far point from squeezing the others: the Tukey
    fence (upper quartile + ``k`` x interquartile range) of ``values``, or None (no limit)
    when nothing lies well beyond it (more than 15% past it: clipping a point just past the
    fence gains nothing) or there are fewer than ``min_points`` values to judge by. Points
    beyond it are drawn at the edge and annotated with their value."""
    if len(values) < min_points:
        return None
    q1, q3 = np.percentile(values, [25, 75])
    fence = float(q3 + k * (q3 - q1))
    return fence if max(values) > 1.15 * fence else None


def quality_vs_speed(
    curves: dict[str, list[dict]],
    out: Path,
    title: str,
    xlabel: str,
    noise: float | None = None,
) -> Path:
    """The quality-vs-speed chart, of the benchmarks (:func:`pareto`) and of the demo's
    report (``demo/report.py``): ROUGE-L against full depth over speedup, one curve per
    entry of ``curves`` (legend label -> points, joined in the order given). A point is a
    dict with ``speedup`` and ``rouge_l``, optionally ``speedup_lo`` / ``speedup_hi`` (its
    spread over rounds, drawn as a horizontal bar) and ``note`` (its annotation when clipped;
    default its speedup, ``3.14x``).

    Full depth is (1, 1) by definition: drawn as dotted lines, not a marker that would hide
    the points around it; ``noise``: a grey band of +-noise around 1 (timing noise). A point
    far beyond the others (above the Tukey fence of the speedups, :func:`axis_limit`) is
    drawn at the axis edge as a triangle and annotated, so it does not squeeze the rest."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    pts = [p for ps in curves.values() for p in ps]
    xmax = axis_limit([p["speedup"] for p in pts])
    ax.axvline(1.0, color="k", lw=0.8, ls=":", zorder=0, label="full depth: (1, 1)")
    ax.axhline(1.0, color="k", lw=0.8, ls=":", zorder=0)
    if noise is not None:
        ax.axvspan(
            1 - noise,
            1 + noise,
            color="grey",
            alpha=0.15,
            lw=0,
            zorder=0,
            label=f"timing noise (±{noise:.0%})",
        )
    spreads = any("speedup_lo" in p or "speedup_hi" in p for p in pts)
    clipped = []
    for label, ps in curves.items():
        cap = (lambda v: min(v, xmax)) if xmax is not None else (lambda v: v)
        xs = [cap(p["speedup"]) for p in ps]
        lo = [x - cap(p.get("speedup_lo", p["speedup"])) for x, p in zip(xs, ps)]
        hi = [cap(p.get("speedup_hi", p["speedup"])) - x for x, p in zip(xs, ps)]
        line = ax.errorbar(
            xs,
            [p["rouge_l"] for p in ps],
            xerr=[np.maximum(lo, 0), np.maximum(hi, 0)] if spreads else None,
            marker="o",
            markersize=4,
            capsize=2,
            elinewidth=0.8,
            linestyle="-" if len(ps) > 1 else "",
            label=label,
        )
        colour = line.lines[0].get_color()
        clipped += [(p, colour) for p in ps if xmax is not None and p["speedup"] > xmax]
    placed: list[float] = []
    for p, colour in sorted(clipped, key=lambda pc: -pc[0]["rouge_l"]):
        ax.plot([xmax], [p["rouge_l"]], marker=">", markersize=9, color=colour, linestyle="")
        # stacked where several clipped points (nearly) share a ROUGE-L
        i = sum(abs(p["rouge_l"] - y) < 0.02 for y in placed)
        placed.append(p["rouge_l"])
        ax.annotate(
            p.get("note", f"{p['speedup']:.2f}x"),
            (xmax, p["rouge_l"]),
            xytext=(-6, 8 + 11 * i),
            textcoords="offset points",
            ha="right",
            fontsize=7,
        )
    if xmax is not None:
        left = min([p.get("speedup_lo", p["speedup"]) for p in pts] + [1 - (noise or 0)])
        ax.set_xlim(left - 0.03, xmax * 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ROUGE-L vs full-depth greedy output")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return save(fig, out)


def pareto(rows: list[dict], out: Path) -> Path:
    """Quality vs speedup of the ``early-exit`` benchmark's rows, one curve per (model,
    strategy), each in sweep order (threshold or draft length), not re-sorted."""
    curves = defaultdict(list)
    for r in rows:
        kind = r["strategy"]
        if r["options"].get("adaptive"):
            kind = "free (adaptive)"
        elif r["options"].get("measure") == "classifier":
            kind = "free (classifier)"
        curves[(r["model"], kind)].append({"speedup": r["speedup"], "rouge_l": r["rouge_l"]})
    return quality_vs_speed(
        {f"{kind} ({model}-trained exits)": ps for (model, kind), ps in sorted(curves.items())},
        out,
        title="Early exit: quality vs speed",
        xlabel="speedup over full depth (same run, batch 1)",
    )


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


def _policy_color(vanilla: bool, policy: str) -> str:
    """Grey for the vanilla baseline, green for depth-wise batching, blue otherwise."""
    return "#888" if vanilla else "#2a7" if policy == "depthwise" else "#79c"


def _ratio_bars(ax, labels: list[str], vals: list[float], colors: list[str], title: str) -> None:
    """One panel of throughput ratios to vanilla continuous batching; the line at 1."""
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x vanilla continuous (same run)", fontsize=8)


def depthwise_quality(rows: list[dict], out: Path) -> Path:
    """Trained models served under each policy, one panel per max batch: throughput /
    vanilla continuous batching, each bar annotated with ROUGE-L against its own model's
    full depth (quality beside speed)."""
    plt = _plt()
    batches = sorted({r["max_batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 5), sharey=True)
    axes = [axes] if len(batches) == 1 else list(axes)
    for ax, mb in zip(axes, batches):
        g = [r for r in rows if r["max_batch"] == mb]
        vals = [r["x_vanilla_continuous"] for r in g]
        colors = [_policy_color("vanilla" in r["label"], r["policy"]) for r in g]
        _ratio_bars(ax, [r["label"] for r in g], vals, colors, f"max batch {mb}")
        for i, r in enumerate(g):
            q = f", ROUGE-L {r['rouge_l']:.2f}" if r.get("exit") else ""
            ax.text(vals[i], i, f" {vals[i]:.2f}x{q}", va="center", fontsize=6)
    axes[0].invert_yaxis()
    fig.suptitle("Trained models served (green = depth-wise batching)", fontsize=10)
    return save(fig, out)


def synthetic(rows: list[dict], out: Path) -> Path:
    """The synthetic-exit map: throughput / vanilla continuous batching per configuration,
    one panel per (shape, max batch); the line at 1 is the crossover."""
    plt = _plt()
    groups = sorted({(r["preset"], r["max_batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 4.2), sharey=True)
    axes = [axes] if len(groups) == 1 else list(axes)
    for ax, (preset, mb) in zip(axes, groups):
        g = [r for r in rows if r["preset"] == preset and r["max_batch"] == mb]
        # panels share the y axis: name a pruned head by what it is, not its size per shape
        labels = [
            f"{r['model']} {re.sub(r' v[0-9]+', ' pruned head', r['decisions'])} {r['policy']}"
            for r in g
        ]
        vals = [r["x_vanilla_continuous"] for r in g]
        colors = [_policy_color(r["model"] == "vanilla", r["policy"]) for r in g]
        _ratio_bars(ax, labels, vals, colors, f"{preset}, max batch {mb}")
    axes[0].invert_yaxis()
    fig.suptitle("Synthetic exits (systems only): green = depth-wise batching", fontsize=10)
    return save(fig, out)


def calls(rows: list[dict], out: Path) -> Path:
    """One depth-wise block call (rows at two loops) over a plain one, by rows and context."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    series = (
        ("mixed_over_plain", "-o", "mixed"),
        ("plain_sdpa_over_plain", ":s", "plain on SDPA"),  # rows from before the kernel lack it
        ("per_row_over_plain", "-.^", "per-row"),
        ("gathered_over_plain", "--x", "gathered"),
    )
    for key, style, name in series:
        for n in sorted({r["rows"] for r in rows}):
            pts = sorted((r["length"], r[key]) for r in rows if r["rows"] == n and key in r)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name}, {n} rows")
    ax.axhline(1.1, color="k", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # the gather reaches ~10x; the kernel's points sit near 1
    ax.set_xlabel("context length")
    ax.set_ylabel("call time / plain call (on the engine's path)")
    ax.set_title("Depth-wise block call (goal <= 1.1x, dotted)")
    ax.legend(fontsize=7)
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
        ("depthwise_synthetic.json", synthetic, "depthwise_synthetic.png"),
        ("depthwise_calls.json", calls, "depthwise_calls.png"),
        ("real_model_early_exit.json", pareto, "real_model_pareto.png"),
        ("batched_exit_demo.json", batched, "batched_exit_demo.png"),
        ("batched_exit_vocab.json", batched, "batched_exit_vocab.png"),
        ("batched_exit_sync.json", batched, "batched_exit_sync.png"),
        ("depthwise_synthetic_nocatchup.json", synthetic, "depthwise_synthetic_nocatchup.png"),
        ("depthwise_smollm2.json", depthwise_quality, "depthwise_smollm2.png"),
        ("depthwise_synthetic_kernel.json", synthetic, "depthwise_synthetic_kernel.png"),
        ("depthwise_smollm2_kernel.json", depthwise_quality, "depthwise_smollm2_kernel.png"),
    ):
        path = results / name
        if path.is_file():
            made.append(fn(json.loads(path.read_text()), out_dir / fig))
    if not made:
        raise EarlyExitError(f"{results}: no benchmark rows to plot (run earlyexit bench ...)")
    return made
