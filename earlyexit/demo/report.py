"""The demo's report folder: ``report.md``, figures and ``sample.html`` (reads rows, never measures).

Every ratio shown (table cell, bar label, plotted point, finding) is the row's stored median
of per-round ratios with its stored spread (:mod:`earlyexit.demo.stats`), written by
:func:`~earlyexit.demo.stats.fmt_ratio`: the report cannot disagree with itself.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from earlyexit.bench.plots import _plt, quality_vs_speed, save
from earlyexit.demo.stats import NOISE, fmt_ratio, ratio_verdict

MODEL_TITLES = {
    "dense": "dense + exits",
    "recursive": "relaxed recursive",
    "mor": "MoR",
    "user": "your model",
}


def table(rows: list[dict]) -> list[list[str]]:
    """One line per (model, strategy): the console and report.md table."""
    out = []
    for r in rows:
        q = "—" if r["rouge_l"] is None else f"{r['rouge_l']:.3f}"
        tm = "—" if r["token_match"] is None else f"{r['token_match']:.3f}"
        spread = r.get("rounds", 1) > 1 and r["curve"] != "full"
        sp = fmt_ratio(
            r["speedup"],
            r["speedup_lo"] if spread else None,
            r["speedup_hi"] if spread else None,
        )
        sp += " †" if r["speedup_vs"] != "full depth" else ""
        out.append(
            [
                MODEL_TITLES.get(r["model"], r["model"]),
                r["label"],
                f"{r['val_nll']:.3f}",
                q,
                tm,
                sp,
                f"{r['mean_depth']:.2f} / {r['n_steps']}",
            ]
        )
    return out


HEADER = ["model", "strategy", "val NLL", "ROUGE-L", "token match", "speedup (spread)", "avg depth"]


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows += ["| " + " | ".join(x) + " |" for x in lines]
    return "\n".join(rows)


def text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def pareto(rows: list[dict], out: Path) -> Path:
    """Quality (ROUGE-L vs full depth) against speedup, one curve per strategy and model
    (:func:`earlyexit.bench.plots.quality_vs_speed`, the benchmarks' chart): each point the
    row's median speedup with its spread over the rounds as a horizontal bar, the timing
    noise band around 1, a clipped point annotated with its label and ratio."""
    curves = defaultdict(list)
    for r in rows:
        if r["rouge_l"] is not None and r["curve"] != "full":
            curves[(r["model"], r["curve"])].append(r)
    points = {}
    for (model, curve), rs in sorted(curves.items()):
        rs.sort(key=lambda r: r["speedup"])
        points[f"{MODEL_TITLES.get(model, model)}: {curve}"] = [
            {
                **r,
                "note": f"{r['label']}: {fmt_ratio(r['speedup'], r.get('speedup_lo'), r.get('speedup_hi'))}",
            }
            for r in rs
        ]
    return quality_vs_speed(
        points,
        out,
        title="Quality vs speed: every strategy on the demo's models",
        xlabel="speedup over the same model's full depth (batch 1, median of rounds; bars: spread)",
        noise=NOISE,
    )


def depth_histogram(depths: dict[str, tuple[list[int], int]], out: Path) -> Path:
    """Share of generated tokens per depth (plan steps run), one panel per model/strategy."""
    plt = _plt()
    n = max(len(depths), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.2), squeeze=False)
    for ax, (title, (ds, n_steps)) in zip(axes[0], depths.items()):
        c = Counter(ds)
        xs = list(range(1, n_steps + 1))
        total = max(len(ds), 1)
        ax.bar(xs, [c.get(x, 0) / total for x in xs], color="#2a7")
        ax.set_xticks(xs)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"depth (steps of {n_steps})", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of tokens")
    return save(fig, out)


def throughput(rows: list[dict], out: Path) -> Path:
    """Engine throughput by model and batching policy as the ratio to dense static batching
    in the same round: each bar is the row's ``x_static`` (the median of the per-round
    ratios), its error bar the spread over the rounds, its label the same text as the
    report table's (:func:`~earlyexit.demo.stats.fmt_ratio`)."""
    plt = _plt()
    models = list(dict.fromkeys(r["model_label"] for r in rows))
    policies = ["static", "continuous", "depthwise"]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    width = 0.8 / len(policies)
    for i, pol in enumerate(policies):
        for j, m in enumerate(models):
            hit = [r for r in rows if r["model_label"] == m and r["policy"] == pol]
            if not hit:
                continue
            r = hit[0]
            v, lo, hi = (
                r["x_static"],
                r.get("x_static_lo", r["x_static"]),
                r.get("x_static_hi", r["x_static"]),
            )
            x = j + i * width
            ax.bar(x, v, width, color=["#888", "#48c", "#2a7"][i], label=pol)
            ax.errorbar(
                x, v, yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], color="k", capsize=3, lw=0.8
            )
            ax.text(x, hi, fmt_ratio(v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), title="batching policy", fontsize=8)
    ax.set_xticks([j + width for j in range(len(models))], models, fontsize=8)
    ax.set_ylabel("throughput / dense static batching (same round)")
    ax.set_title("Serving a request stream: median of per-round ratios, bars = spread")
    return save(fig, out)


def _colour(depth: int, n_steps: int) -> str:
    """Shallow tokens green, full-depth tokens white: the eye finds the saved compute."""
    f = 1.0 if n_steps <= 1 else (depth - 1) / (n_steps - 1)
    r, g, b = (int(120 + 135 * f), int(220 + 35 * f), int(120 + 135 * f))
    return f"rgb({r},{g},{b})"


def sample_html(prompt: str, samples: list[dict], out: Path, note: str | None = None) -> Path:
    """``samples``: [{title, pieces: [(text, depth)], n_steps}]; tokens coloured by depth.
    ``note``: a paragraph shown first (what to expect of the text)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>earlyexit demo: depth per token</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{font-family:monospace;white-space:pre-wrap;border:1px solid #ccc;padding:.6em;line-height:1.5}"
        "span.t{border-radius:2px}.p{color:#888}</style>",
        "<h1>Depth per generated token</h1>",
        "<p>Each generated token's background shows how many plan steps (layers, or layer "
        "applications for recursive models) it ran: <span style='background:"
        + _colour(1, 8)
        + "'>&nbsp;shallow&nbsp;</span> to <span style='background:"
        + _colour(8, 8)
        + ";border:1px solid #ccc'>&nbsp;full depth&nbsp;</span>. Hover a token for its depth. "
        "The prompt is grey.</p>",
    ]
    if note:
        parts.insert(3, f"<p style='background:#fff6d5;padding:.6em'>{html.escape(note)}</p>")
    for s in samples:
        n = s["n_steps"]
        mean = sum(d for _, d in s["pieces"]) / max(len(s["pieces"]), 1)
        parts.append(
            f"<h2>{html.escape(s['title'])}</h2><p>average depth {mean:.2f} of {n}</p><pre>"
        )
        parts.append(f"<span class='p'>{html.escape(prompt)}</span>")
        for text, d in s["pieces"]:
            parts.append(
                f"<span class='t' title='depth {d}/{n}' style='background:{_colour(d, n)}'>{html.escape(text)}</span>"
            )
        parts.append("</pre>")
    out.write_text("".join(parts) + "\n", encoding="utf-8")
    return out


def _spread(lo: float, hi: float) -> str:
    return f"{lo:.2f}-{hi:.2f}x"


def depth_bound(r: dict) -> float | None:
    """The most a strategy can gain from the depth it saved (full depth / its mean depth),
    if running fewer steps were the whole story; None where it is not (self-speculation
    verifies several tokens per deep pass, so its gain is not a depth saving)."""
    if r["curve"] == "speculative" or r["mean_depth"] <= 0:
        return None
    return r["n_steps"] / r["mean_depth"]


def speedup_verdict(r: dict, tolerance: float = 1.1, max_spread: float = 0.5) -> str:
    """``faster``, ``slower`` or ``unclear`` for a row measured in several rounds.

    Faster: above ``1 + NOISE`` in every round (a ratio whose rounds touch the ±3% noise
    band is not a speedup, :func:`~earlyexit.demo.stats.ratio_verdict`), and not faster
    than the depth it saved can explain (``tolerance`` allows for noise; a larger "speedup"
    is timing noise, e.g. a strategy that never exited). Slower: below ``1 - NOISE`` in every
    round. Unclear: anything else, or rounds that disagree by more than ``max_spread`` of
    the median (a busy machine)."""
    lo, hi = r.get("speedup_lo", r["speedup"]), r.get("speedup_hi", r["speedup"])
    if r.get("rounds", 1) < 2 or (hi - lo) > max_spread * r["speedup"]:
        return "unclear"
    bound = depth_bound(r)
    verdict = ratio_verdict(lo, hi)
    if verdict == "above" and (bound is None or r["speedup"] <= bound * tolerance):
        return "faster"
    if verdict == "below":
        return "slower"
    return "unclear"


def findings(
    rows: list[dict],
    engine: list[dict],
    nll: dict | None = None,
    min_quality: float = 0.99,
) -> list[str]:
    """Plain-language findings of one run, computed from its rows (nothing hard-coded).

    A finding is stated only where the measurement supports it: a speedup must hold in every
    timing round, beyond the ±3% noise band, and be consistent with the depth saved; a
    serving ranking must be outside the run-to-run spread; an NLL difference must exceed
    twice its paired standard error. Otherwise the finding says the run cannot tell.
    ``nll``: the models' :func:`~earlyexit.evaluation.perplexity.perplexity` results; MoR's
    may carry ``vs_dense`` (its per-token difference to the dense model, see
    :func:`nll_comparison`)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        title = MODEL_TITLES.get(model, model)
        mine = [r for r in rows if r["model"] == model and r["curve"] != "full"]
        good = [r for r in mine if (r["rouge_l"] or 0) >= min_quality]
        if not mine or not good:
            if mine:
                out.append(
                    f"{title}: no strategy keeps ROUGE-L >= {min_quality} against full depth."
                )
            continue
        faster = [r for r in good if speedup_verdict(r) == "faster"]
        if faster:
            best = max(faster, key=lambda r: r["speedup"])
            out.append(
                f"{title}: the fastest strategy that keeps ROUGE-L >= {min_quality} is "
                f"{best['label']} at {best['speedup']:.2f}x full depth "
                f"({_spread(best['speedup_lo'], best['speedup_hi'])} over {best['rounds']} rounds; "
                f"average depth {best['mean_depth']:.2f} of {best['n_steps']})."
            )
            continue
        noisy = [
            r
            for r in good
            if (b := depth_bound(r)) is not None and r["speedup"] > b * 1.1 and r["speedup"] > 1
        ]
        if all(speedup_verdict(r) == "slower" for r in good):
            out.append(
                f"{title}: no strategy that keeps ROUGE-L >= {min_quality} beats full depth; "
                f"each was slower in every round."
            )
        else:
            msg = (
                f"{title}: no strategy that keeps ROUGE-L >= {min_quality} was faster than full "
                f"depth by more than the ±{NOISE:.0%} timing noise in every round: the "
                f"differences are within this run's noise (too short a run to tell)"
            )
            if noisy:
                r = max(noisy, key=lambda r: r["speedup"])
                msg += (
                    f"; e.g. {r['label']} measured {r['speedup']:.2f}x at average depth "
                    f"{r['mean_depth']:.2f} of {r['n_steps']}, more than its saved depth allows"
                )
            out.append(msg + ".")
    if engine:
        out += _serving_findings(engine, rows, min_quality)
    if nll and "mor" in nll and "dense" in nll:
        out.append(_mor_finding(nll["mor"], nll["dense"]))
    return out


def _serving_findings(
    engine: list[dict], rows: list[dict] | None = None, min_quality: float = 0.99
) -> list[str]:
    out = []
    lo = {id(e): e.get("x_static_lo", e["x_static"]) for e in engine}
    hi = {id(e): e.get("x_static_hi", e["x_static"]) for e in engine}
    best = max(engine, key=lambda e: e["x_static"])
    others = [e for e in engine if e is not best]
    name = f"{best['model_label']} with {best['policy']} batching"
    if best.get("rounds", 1) >= 2 and all(lo[id(best)] > hi[id(e)] for e in others):
        out.append(
            f"Serving: the highest throughput was {name} "
            f"({best['x_static']:.2f}x dense static, {_spread(lo[id(best)], hi[id(best)])}), "
            f"ahead of every other configuration in every round."
        )
    else:
        close = [e for e in others if hi[id(e)] >= lo[id(best)]]
        names = ", ".join(f"{e['model_label']} {e['policy']}" for e in close[:3])
        out.append(
            f"Serving: the highest median throughput was {name} ({best['x_static']:.2f}x dense "
            f"static), but its spread overlaps {names}: this run cannot rank them."
        )
    adaptive = [e for e in engine if e["exit"] is not None or e["model"] == "mor"]
    if adaptive and all(ratio_verdict(lo[id(e)], hi[id(e)]) == "below" for e in adaptive):
        out.append(
            "Every configuration that gives tokens less depth served slower than dense static "
            "batching in every round: on this machine, per-token depth did not pay in batched "
            "serving."
        )
    paid = [
        e
        for e in adaptive
        if ratio_verdict(lo[id(e)], hi[id(e)]) == "above" and e.get("rounds", 1) >= 2
    ]
    if paid:
        e = max(paid, key=lambda e: e["x_static"])
        how = (
            f" (exit after step {e['exit']['step']} at threshold λ = {e['exit']['threshold']})"
            if e["exit"]
            else ""
        )
        text = (
            f"Per-token depth paid in serving: {e['model_label']}{how} with {e['policy']} "
            f"batching served {e['x_static']:.2f}x dense static "
            f"({_spread(lo[id(e)], hi[id(e)])}) at average depth {e['mean_depth']:.2f}."
        )
        out.append(text + _serving_quality(e, rows or [], min_quality))
    return out


def _serving_quality(e: dict, rows: list[dict], min_quality: float) -> str:
    """Serving measures speed only; for exits, bound the quality from the batch-1 rows of the
    same model: the best ROUGE-L of any strategy that went no deeper on average."""
    if e["exit"] is None:
        return ""  # routers (MoR) decide depth by design; their quality is the NLL
    as_shallow = [
        r
        for r in rows
        if r["model"] == e["model"]
        and r["curve"] != "full"
        and r.get("rouge_l") is not None
        and r["mean_depth"] <= e["mean_depth"] + 1e-9
    ]
    if not as_shallow:
        return " Serving measures speed only; no batch-1 row of this model went as shallow."
    best = max(r["rouge_l"] for r in as_shallow)
    verdict = (
        ""
        if best >= min_quality
        else f", below the {min_quality} bar: a speed gain, not a free one"
    )
    return (
        f" Serving measures speed only: at batch 1, no strategy of this model that went as "
        f"shallow on average kept ROUGE-L above {best:.3f}{verdict}."
    )


MOR_CAVEAT = (
    " Caveats: the ablation in BENCHMARKS.md (`mor-isoflop`) finds that at this scale the gain "
    "comes from the router's gate on each recursion's update, not from routing tokens to "
    "different depths; and the dense model here was trained with FREE's exit loss (its "
    "shallow exit shares the training signal), so it is not the plain LM-only model the "
    "README's MoR comparison uses."
)


def nll_comparison(a, b, seq_len: int) -> dict:
    """MoR against the dense model on the same tokens: per-token NLL arrays ``a`` (MoR) and
    ``b`` (dense), in the same order. ``diff`` = mean(a) - mean(b); ``paired_se`` its
    standard error with each window of ``seq_len`` tokens as one independent unit
    (:func:`~earlyexit.demo.stats.paired_se`)."""
    from earlyexit.demo.stats import paired_se

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return {
        "diff": float(a.mean() - b.mean()),
        "paired_se": paired_se(a, b, cluster=seq_len),
        "tokens": int(a.size),
        "windows": int(a.size // seq_len),
        "seq_len": seq_len,
    }


def _mor_finding(mor: dict, dense: dict) -> str:
    """MoR's validation NLL against the dense model's, both trained here at equal FLOPs and
    scored on the same tokens: the verdict uses the paired standard error of the per-token
    differences (``mor["vs_dense"]``, :func:`nll_comparison`), and the finding carries the
    ablation's caveat."""
    a, b = mor["nll"], dense["nll"]
    vs = mor.get("vs_dense") or {}
    on = f" on the same {vs['tokens']:,} validation tokens" if vs.get("tokens") else ""
    text = (
        f"MoR: validation NLL {a:.3f} against the dense model's {b:.3f}{on}, trained here at "
        f"equal training FLOPs"
    )
    se = vs.get("paired_se")
    if se is None:
        return text + " (too few evaluation windows for an error bar: no verdict)." + MOR_CAVEAT
    what = (
        f"paired standard error {se:.3f}: the standard error of the mean per-token NLL "
        f"difference, both models scored on the same tokens, each {vs['seq_len']}-token "
        f"window one unit"
    )
    d = vs["diff"]
    if abs(d) <= 2 * se:
        return (
            text
            + f": the difference ({d:+.3f}) is within twice its standard error ({what})."
            + MOR_CAVEAT
        )
    better = "lower" if d < 0 else "higher"
    return (
        text
        + f": {better} by {abs(d):.3f}, {abs(d) / se:.1f} times its standard error ({what})."
        + MOR_CAVEAT
    )
