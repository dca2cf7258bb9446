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
        sp = f"{r['speedup']:.2f}x" + (" †" if r["speedup_vs"] != "full depth" else "")
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


HEADER = ["model", "strategy", "val NLL", "ROUGE-L", "token match", "speedup", "avg depth"]


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


def findings(rows: list[dict], engine: list[dict], min_quality: float = 0.99) -> list[str]:
    """Plain-language findings of one run, computed from its rows (nothing hard-coded)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        cands = [
            r
            for r in rows
            if r["model"] == model and r["curve"] != "full" and (r["rouge_l"] or 0) >= min_quality
        ]
        if cands:
            best = max(cands, key=lambda r: r["speedup"])
            out.append(
                f"{MODEL_TITLES.get(model, model)}: the fastest strategy that keeps ROUGE-L >= "
                f"{min_quality} is {best['label']} at {best['speedup']:.2f}x "
                f"(average depth {best['mean_depth']:.2f} of {best['n_steps']})"
                + ("." if best["speedup"] > 1 else ": none beats full depth.")
            )
    if engine:
        best = max(engine, key=lambda e: e["x_static"])
        exits = [e for e in engine if e["exit"] is not None or e["model"] == "mor"]
        out.append(
            f"Serving: the highest throughput was {best['model_label']} with {best['policy']} "
            f"batching ({best['x_static']:.2f}x dense static)."
        )
        if exits and all(e["x_static"] < 1 for e in exits):
            out.append(
                "Every configuration that gives tokens less depth served slower than dense static "
                "batching here: on this machine, per-token depth did not pay in batched serving "
                "(BENCHMARKS.md, `depthwise`, explains what the time goes to)."
            )
    return out
