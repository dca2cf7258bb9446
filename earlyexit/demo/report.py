"""The demo's report folder: ``report.md``, figures and ``sample.html`` (reads rows, never measures)."""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from pathlib import Path

from earlyexit.bench.plots import _plt, save

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
        sp = f"{r['speedup']:.2f}x"
        if r.get("rounds", 1) > 1 and r["curve"] != "full":
            sp += f" ({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f})"
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
    """Quality (ROUGE-L vs full depth) against speedup, one curve per strategy and model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curves = defaultdict(list)
    for r in rows:
        if r["rouge_l"] is None or r["curve"] == "full":
            continue
        curves[(r["model"], r["curve"])].append((r["speedup"], r["rouge_l"]))
    for (model, curve), pts in sorted(curves.items()):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if len(pts) > 1 else "",
            label=f"{MODEL_TITLES.get(model, model)}: {curve}",
        )
    ax.plot([1.0], [1.0], marker="*", markersize=14, color="k", linestyle="", label="full depth")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speedup over the same model's full depth (batch 1, measured)")
    ax.set_ylabel("ROUGE-L vs full-depth greedy output")
    ax.set_title("Quality vs speed: every strategy on the demo's models")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return save(fig, out)


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
    """Engine tokens/s by model and batching policy, with the ratio to dense static."""
    plt = _plt()
    models = list(dict.fromkeys(r["model_label"] for r in rows))
    policies = ["static", "continuous", "depthwise"]
    base = next((r["tokens_per_s"] for r in rows if r["policy"] == "static"), None)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(policies)
    for i, pol in enumerate(policies):
        for j, m in enumerate(models):
            hit = [r for r in rows if r["model_label"] == m and r["policy"] == pol]
            if not hit:
                continue
            v = hit[0]["tokens_per_s"]
            x = j + i * width
            ax.bar(x, v, width, color=["#888", "#48c", "#2a7"][i], label=pol)
            if base:
                ax.text(x, v, f"{v / base:.2f}x", ha="center", va="bottom", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), title="batching policy")
    ax.set_xticks([j + width for j in range(len(models))], models, fontsize=8)
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Serving a request stream (ratios: / dense with static batching)")
    return save(fig, out)


def _colour(depth: int, n_steps: int) -> str:
    """Shallow tokens green, full-depth tokens white: the eye finds the saved compute."""
    f = 1.0 if n_steps <= 1 else (depth - 1) / (n_steps - 1)
    r, g, b = (int(120 + 135 * f), int(220 + 35 * f), int(120 + 135 * f))
    return f"rgb({r},{g},{b})"


def sample_html(prompt: str, samples: list[dict], out: Path) -> Path:
    """``samples``: [{title, pieces: [(text, depth)], n_steps}]; tokens coloured by depth."""
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

    Faster: above 1 in every round, and not faster than the depth it saved can explain
    (``tolerance`` allows for noise; a larger "speedup" is timing noise, e.g. a strategy
    that never exited). Slower: below 1 in every round. Unclear: anything else, or rounds
    that disagree by more than ``max_spread`` of the median (a busy machine)."""
    lo, hi = r.get("speedup_lo", r["speedup"]), r.get("speedup_hi", r["speedup"])
    if r.get("rounds", 1) < 2 or (hi - lo) > max_spread * r["speedup"]:
        return "unclear"
    bound = depth_bound(r)
    if lo > 1.0 and (bound is None or r["speedup"] <= bound * tolerance):
        return "faster"
    if hi < 1.0:
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
    timing round and be consistent with the depth saved; a serving ranking must be outside
    the run-to-run spread; an NLL difference must exceed twice its standard error.
    Otherwise the finding says the run cannot tell."""
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
                f"depth in every round: the differences are within this run's timing noise "
                f"(too short a run to tell)"
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
    if adaptive and all(hi[id(e)] < 1 for e in adaptive):
        out.append(
            "Every configuration that gives tokens less depth served slower than dense static "
            "batching in every round: on this machine, per-token depth did not pay in batched "
            "serving."
        )
    paid = [e for e in adaptive if lo[id(e)] > 1 and e.get("rounds", 1) >= 2]
    if paid:
        e = max(paid, key=lambda e: e["x_static"])
        text = (
            f"Per-token depth paid in serving: {e['model_label']} with {e['policy']} batching "
            f"served {e['x_static']:.2f}x dense static ({_spread(lo[id(e)], hi[id(e)])}) at "
            f"average depth {e['mean_depth']:.2f}."
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


def _mor_finding(mor: dict, dense: dict) -> str:
    """MoR's validation NLL against the dense model's, both trained here at equal FLOPs."""
    a, b = mor["nll"], dense["nll"]
    se = [x.get("nll_se") for x in (mor, dense)]
    text = f"MoR: validation NLL {a:.3f} against the dense model's {b:.3f}, trained here at equal training FLOPs"
    if None in se:
        return text + " (one evaluation batch: no error bar, no verdict)."
    margin = 2 * (se[0] ** 2 + se[1] ** 2) ** 0.5
    if abs(a - b) <= margin:
        return text + f": the difference is within twice its standard error ({margin:.3f})."
    better = "lower" if a < b else "higher"
    return (
        text + f": {better} by {abs(a - b):.3f}, more than twice its standard error ({margin:.3f})."
    )
