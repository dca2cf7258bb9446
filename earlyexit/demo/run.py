"""``earlyexit demo``: the main job, end to end on this machine with no downloads.

1. prepares the corpus (the running interpreter's standard library);
2. trains, or reuses from the cache directory, a dense model with exits, its relaxed
   recursive conversion (uptrained, with a loop exit) and a Mixture-of-Recursions model
   (``pipeline.py``); checks the dense model against ``transformers`` on the same weights;
3. decodes validation prompts with every strategy each model serves, and drives the engine
   with a request stream under each batching policy (``evaluate.py``);
4. prints one table and writes the report folder (``report.py``).

``--model DIR`` (or a Hugging Face hub name, downloaded when online) runs steps 3-4 on a
user's model instead of the trained ones.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from earlyexit.bench.common import request_stream
from earlyexit.demo import pipeline, report
from earlyexit.demo.evaluate import (
    dense_configs,
    engine_jobs,
    engine_rows,
    recursive_configs,
    strategy_rows,
)
from earlyexit.errors import InputError
from earlyexit.progress import fmt_seconds
from earlyexit.progress import progress as progress_bar


def default_home() -> Path:
    return Path(os.environ.get("EARLYEXIT_HOME", "~/.cache/earlyexit")).expanduser()


def main(
    out_dir: str | None = None,
    quick: bool = False,
    as_json: bool = False,
    model: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    device: str = "auto",
    dtype: str | None = None,
    precision: str = "auto",
) -> int:
    from earlyexit.device import resolve_device, resolve_dtype, resolve_precision

    dev = resolve_device(device)  # one clear error before any work
    resolve_dtype(dtype, dev)
    train_precision, why = resolve_precision(precision, dev)
    plan = pipeline.QUICK if quick else pipeline.FULL
    work = (
        Path(out_dir).expanduser()
        if out_dir
        else default_home() / ("demo-quick" if quick else "demo")
    )
    work.mkdir(parents=True, exist_ok=True)
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    def say(*a) -> None:
        print(*a, file=sys.stderr, flush=True)

    # a bar on a terminal, a line every EARLYEXIT_PROGRESS_EVERY seconds in a log or pipe
    progress = progress and not as_json
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    say(f"earlyexit demo{' --quick' if quick else ''}: work directory {work}")
    say(f"device {dev}, {threads} thread(s); training precision {train_precision} ({why})")

    # ------------------------------------------------------------------ data + models
    from earlyexit.training.corpus import prepare

    model_dir = _resolve_model(model, work) if model else None  # resolved (downloaded) once
    user_tok = _user_tokenizer(model_dir) if model_dir else None
    data = work / ("data" if user_tok is None else "data-user")
    data_ready = (data / "manifest.json").is_file()
    if model:  # a pretrained model: an exit fine-tune if it has none (its body frozen)
        up = pipeline.USER_EXIT_QUICK if quick else pipeline.USER_EXIT_FULL
        st = (
            []
            if _has_trained_exits(model_dir)
            else [
                pipeline.user_exit_stage(
                    plan, up, model_dir, work, data, threads, str(dev), train_precision
                )
            ]
        )
    else:
        st = pipeline.stages(plan, work, data, threads, device=str(dev), precision=train_precision)
    todo = [s for s in st if not pipeline.is_done(s)]
    # the estimate comes from one training step timed here, now (a few seconds at most)
    est = pipeline.Estimate(plan, pipeline.probe_step_seconds(plan, str(dev), train_precision))
    eta = (0 if data_ready else est.data()) + sum(est.stage(s) for s in todo) + est.measure()
    say(
        f"plan: {'reuse every cached model' if not todo else f'train {len(todo)} stage(s)'}, "
        f"then measure. One training step of the dense model takes {est.step_s:.2f} s here: "
        f"expected time ~{fmt_seconds(eta)} (revised as stages finish)"
    )
    t = time.perf_counter()
    say("[data] preparing the corpus" + (" (cached)" if data_ready else ""))
    prepare(
        pipeline.corpus_spec(plan),
        data,
        vocab_size=plan.vocab_size,
        tokenizer=user_tok,
        log=lambda m: say(f"  {m}"),
    )
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    built, trained_s, reused = pipeline.build(st, progress, lambda m: say(f"  {m}"), est)
    if st:
        timings["training"] = time.perf_counter() - t
        timings.update({f"train {k}": v for k, v in trained_s.items()})
    if reused:
        say(f"[train] reused cached stage(s): {', '.join(reused)}")
    if model:
        paths = {"user": built.get("user-exit", model_dir)}
    else:
        paths = {
            "dense": built["dense-exits"],
            "recursive": built["recursive"],
            "mor": built["mor"],
        }

    # ------------------------------------------------------------------ measurements
    import earlyexit
    from earlyexit.bench.common import validation_prompts
    from earlyexit.evaluation.perplexity import perplexity
    from earlyexit.training.data import token_file

    t = time.perf_counter()
    say(f"[measure] expected ~{fmt_seconds(est.measure())}")
    lms = {k: earlyexit.load(p, device=dev, dtype=dtype) for k, p in paths.items()}
    parity = _parity(paths.get("dense") or paths["user"], work / "hf-export")
    if "skipped" in parity:
        say(f"[check] transformers parity skipped: {parity['skipped']}")
    else:
        say(
            f"[check] exported to Hugging Face format and reloaded with transformers: max |logit diff| "
            f"{parity['max_logit_diff']:.1e}, greedy tokens identical: {parity['greedy_tokens_identical']}"
        )
    evals = {
        k: perplexity(
            p,
            data,
            seq_len=plan.seq_len,
            batch_size=8,
            max_batches=plan.eval_batches,
            device=str(dev),
            dtype=dtype,
        )
        for k, p in paths.items()
    }
    nll = {k: v["nll"] for k, v in evals.items()}
    prompts = validation_prompts(data, plan.prompts, plan.prompt_len)
    jobs = []
    for k, lm in lms.items():
        if k == "recursive":
            jobs.append((k, lm, recursive_configs(lm.model)))
        elif k != "mor":
            jobs.append((k, lm, dense_configs(lm.model, _draft_tokens(lm, data))))
    rounds = plan.rounds  # progress units: every timed decode of every round
    n_cfg = sum((len(c) + 1) * rounds + 1 for _, _, c in jobs) + (rounds + 1) * ("mor" in lms)
    say(
        f"[decode] {plan.prompts} validation prompts x {plan.new_tokens} tokens, batch 1, "
        f"every strategy, {plan.rounds} interleaved timing rounds"
    )
    bar = progress_bar(progress, n_cfg, "[decode] timed decodes", log=say, unit="run")
    rows, depths = [], {}
    dense_full_time = None
    for k, lm, cfgs in jobs:
        r, d = strategy_rows(
            k, lm, prompts, plan.new_tokens, cfgs, nll[k], plan.rounds, on_config=bar.update
        )
        rows += r
        depths[k] = (d, lm.model.n_steps)
        if k == "dense":
            dense_full_time = r[0]["seconds"]
    if "mor" in lms:
        r, d = strategy_rows(
            "mor",
            lms["mor"],
            prompts,
            plan.new_tokens,
            [],
            nll["mor"],
            plan.rounds,
            reference_time=dense_full_time,
            on_config=bar.update,
        )
        rows += r
        depths["mor"] = (d, lms["mor"].model.n_steps)
    bar.close()
    timings["decode"] = time.perf_counter() - t

    t = time.perf_counter()
    stream = request_stream(
        token_file(data, "val"),
        plan.requests,
        plan.mean_len,
        max_prompt=plan.prompt_len,
        min_gen=4,
        max_gen=2 * plan.mean_len,
    )
    say(
        f"[engine] {plan.requests} requests arriving at once, max batch {plan.max_batch}, "
        f"under each batching policy, {plan.rounds} interleaved rounds"
    )
    bar = progress_bar(
        progress, len(engine_jobs(lms)) * plan.rounds, "[engine] runs", log=say, unit="run"
    )
    engine = engine_rows(lms, stream, plan.max_batch, plan.rounds, on_job=bar.update)
    bar.close()
    timings["engine"] = time.perf_counter() - t

    samples = _samples(lms, data)
    timings["total"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ report
    rep = work / "report"
    rep.mkdir(exist_ok=True)
    lines = report.table(rows)
    say("\n" + report.text_table(report.HEADER, lines))
    if "mor" in lms:
        say(
            "† MoR: speedup against the dense model's full depth (the same nominal depth); ROUGE-L is not defined across models."
        )
    say("\n" + report.text_table(ENGINE_HEADER, _engine_lines(engine)))
    found = report.findings(rows, engine, evals)
    figs = _figures(rows, depths, engine, rep, say)
    report_md = _write_report(
        rep, plan, quick, paths, rows, engine, parity, evals, timings, reused, figs, threads, found
    )
    if samples:
        report.sample_html(samples["prompt"], samples["items"], rep / "sample.html")
    results = {
        "rows": rows,
        "engine": [{k: v for k, v in e.items() if k != "depths"} for e in engine],
        "parity": parity,
        "nll": evals,
        "findings": found,
        "precision": train_precision,
        "timings": timings,
    }
    (rep / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for f in found:
        say(f"* {f}")
    say(f"\nreport: {report_md}   (done in {fmt_seconds(timings['total'])})")
    if as_json:
        print(
            json.dumps({"work": str(work), "report": str(report_md), **results, "reused": reused})
        )
    if "skipped" not in parity and not parity["greedy_tokens_identical"]:
        say("error: our decoder and transformers disagree on the same weights")
        return 1
    return 0


# ---------------------------------------------------------------------- helpers
def _resolve_model(model: str, work: Path) -> Path:
    """A named model (``smollm2``), a local directory (ours or Hugging Face's, which is
    converted once into ``work``), or a hub name downloaded with huggingface_hub (online)."""
    from earlyexit.registry import NAMED, resolve_model

    p = Path(model).expanduser()
    if model in NAMED and not p.exists():
        return resolve_model(model)
    if p.is_dir():
        return _ours(p, work)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise InputError(
            f"{model}: not a model directory (and not a named model like smollm2 or a hub "
            f"name like org/name)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"{model}: downloading from the hub needs `pip install 'earlyexit[hf]'`"
        ) from None
    try:
        got = snapshot_download(
            model, allow_patterns=["*.json", "*.jinja", "*.safetensors", "tokenizer*"]
        )
    except Exception as e:  # offline, unknown repo, gated...
        raise InputError(
            f"{model}: could not download from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None
    return _ours(Path(got), work)


def _ours(model_dir: Path, work: Path) -> Path:
    """``model_dir`` in our checkpoint format (a Hugging Face directory is converted into
    ``work/user-model`` once; fine-tuning and the stage stamps read our format)."""
    from earlyexit.api import _is_hf_dir

    if not _is_hf_dir(model_dir):
        return model_dir
    from earlyexit.models.hf import hf_import

    dst = work / "user-model"
    marker = dst / "source.txt"
    if not (marker.is_file() and marker.read_text() == str(model_dir.resolve())):
        hf_import(model_dir, dst)
        marker.write_text(str(model_dir.resolve()))
    return dst


def _draft_tokens(lm, data: Path):
    """A large vocabulary's most frequent 8k tokens in the corpus (FR-Spec drafting); None
    for vocabularies small enough that the full head is cheap."""
    if lm.config.vocab_size <= 16384:
        return None
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.training.data import token_file

    return frequent_tokens(token_file(data, "train"), 8192, lm.config.vocab_size)


def _has_trained_exits(model_dir: Path) -> bool:
    from earlyexit.checkpoint import load_config

    exits = load_config(model_dir).exits
    return bool(exits.steps) and exits.trained


def _user_tokenizer(model_dir: Path) -> str:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            f"{model_dir}: the demo needs the model's tokenizer.json to tokenize the corpus"
        )
    return str(path)


ENGINE_HEADER = [
    "model",
    "policy",
    "tokens/s",
    "vs dense static (spread)",
    "avg depth",
    "rows per block call",
]


def _engine_lines(engine: list[dict]) -> list[list[str]]:
    return [
        [
            e["model_label"],
            e["policy"],
            f"{e['tokens_per_s']:.0f}",
            f"{e['x_static']:.2f}x"
            + (f" ({e['x_static_lo']:.2f}-{e['x_static_hi']:.2f})" if e["rounds"] > 1 else ""),
            f"{e['mean_depth']:.2f}",
            f"{e['occupancy']:.1f}",
        ]
        for e in engine
    ]


def _parity(path: Path, hf_dir: Path) -> dict:
    """Export the model at ``path`` to ``hf_dir``, reload it with transformers, compare logits
    and greedy tokens (on the CPU in fp32, whatever the demo's device: a parity check)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'earlyexit[hf]')"}
    import earlyexit

    lm = earlyexit.load(path, device="cpu", dtype="float32")
    if lm.config.sharing.scheme != "none" or lm.config.exits.norms or lm.config.exits.classifier:
        return {"skipped": "the model does not export as a plain Llama"}
    transformers.utils.logging.disable_progress_bar()
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.models.hf import hf_export

    hf_export(lm.model, hf_dir, lm.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([lm.encode("def main(argv):\n    ")])
    with torch.inference_mode():
        diff = (hf(ids).logits - lm.model(ids)).abs().max().item()
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[
            0, ids.shape[1] :
        ].tolist()
    ours = generate(
        lm.model, [ids[0].tolist()], SamplingParams(max_new_tokens=16, ignore_eos=True)
    )[0].token_ids
    return {"max_logit_diff": diff, "greedy_tokens_identical": theirs == ours}


def _samples(lms: dict, data: Path) -> dict | None:
    """One prompt generated by each model with its most economical strategy, token by token."""
    from earlyexit.decoding.sampling import SamplingParams

    lm0 = next(iter(lms.values()))
    if lm0.tokenizer is None:
        return None
    prompt = (
        'import os\n\n\ndef read_config(path):\n    """Return the settings stored in *path*."""\n'
    )
    # sampled (seeded), not greedy: small models fall into greedy repetition loops
    items = []
    for key, strategy, opts, title in (
        ("dense", "free", {"threshold": 0.1}, "dense + exits, FREE (λ = 0.1)"),
        ("user", "full", {}, "your model, full depth"),
        ("recursive", "free", {"threshold": 0.1}, "relaxed recursive, loop exit (FREE, λ = 0.1)"),
        ("mor", "full", {}, "Mixture-of-Recursions, router-decided depth"),
    ):
        lm = lms.get(key)
        if lm is None or (strategy != "full" and not lm.config.exits.steps):
            continue
        ids = lm.encode(prompt)
        res = lm.generate(
            ids,
            strategy=lm.strategy(strategy, **opts),
            params=SamplingParams(
                max_new_tokens=64, temperature=0.7, top_p=0.95, seed=0, ignore_eos=True
            ),
        )
        pieces, prev = [], ""
        for i, d in enumerate(res.depths):
            text = lm.tokenizer.decode(res.token_ids[: i + 1])
            pieces.append((text[len(prev) :], d))
            prev = text
        items.append({"title": title, "pieces": pieces, "n_steps": lm.model.n_steps})
    return {"prompt": prompt, "items": items}


def _figures(rows, depths, engine, rep: Path, say) -> list[str]:
    try:
        report._plt()
    except Exception as e:
        say(f"figures skipped: {e}")
        return []
    hist = {}
    pick = {
        "dense": ("free λ=0.1", "dense + exits: FREE λ=0.1"),
        "user": ("full", "your model"),
        "recursive": ("loop exit free λ=0.1", "recursive: loop exit λ=0.1"),
        "mor": ("full", "MoR: router depth"),
    }
    for k, (ds, n) in depths.items():
        label, title = pick[k]
        if label in ds:
            hist[title] = (ds[label], n)
    made = [
        report.pareto(rows, rep / "pareto.png"),
        report.depth_histogram(hist, rep / "depth_histogram.png"),
        report.throughput(engine, rep / "throughput.png"),
    ]
    return [p.name for p in made]


def _write_report(
    rep, plan, quick, paths, rows, engine, parity, evals, timings, reused, figs, threads, found
) -> Path:
    from earlyexit import __version__

    env = f"earlyexit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, {threads} CPU thread(s)"
    lines = [
        "# earlyexit demo report",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {env}"
        + (" · **--quick: tiny models, numbers not meaningful**" if quick else ""),
        "",
        "Every number below was measured by this run, on this machine (`earlyexit demo`); the",
        "benchmark suite with larger runs is in BENCHMARKS.md.",
        "",
        "## Models",
        "",
        "| model | checkpoint | validation NLL (± standard error) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {report.MODEL_TITLES.get(k, k)} | `{p}` | {evals[k]['nll']:.3f}"
        + (f" ± {evals[k]['nll_se']:.3f}" if evals[k].get("nll_se") is not None else "")
        + " |"
        for k, p in paths.items()
    ]
    if reused:
        lines += [
            "",
            f"Reused from the cache: {', '.join(reused)} (delete the work directory to retrain).",
        ]
    if "skipped" not in parity:
        lines += [
            "",
            f"Interop: the dense model exported to Hugging Face format and reloaded with `transformers` "
            f"gives max |logit diff| {parity['max_logit_diff']:.1e}; greedy tokens identical: "
            f"{parity['greedy_tokens_identical']}.",
        ]
    lines += [
        "",
        "## What this run shows",
        "",
        f"Each timing was repeated in {plan.rounds} interleaved rounds; a finding is stated only "
        "where every round agrees (and a speedup is no larger than the depth saved allows).",
        "",
    ]
    lines += [f"- {f}" for f in found]
    lines += [
        "",
        "## Strategies (batch 1)",
        "",
        f"{plan.prompts} validation prompts of {plan.prompt_len} tokens, {plan.new_tokens} greedy tokens each, one at a time. "
        "**Quality** = agreement with the same model's full-depth output (ROUGE-L, token match); "
        "**speedup** = full-depth time / strategy time, median over the rounds (spread: lowest-highest); "
        "**avg depth** = plan steps run per token.",
        "",
        report.markdown_table(report.HEADER, report.table(rows)),
        "",
        "† MoR has no full-depth twin: its speedup is against the dense model's full depth on the same prompts, "
        "and its quality is its validation NLL."
        if any(r["model"] == "mor" for r in rows)
        else "",
        "",
        "How to read it: a strategy is worth using where its speedup is above 1 and its ROUGE-L near 1. "
        "`speculative` is lossless by construction (ROUGE-L 1.000): its speedup is the draft acceptance "
        "paying for the verification pass. FREE and CALM trade quality for depth through λ.",
        "",
        "## Serving (engine)",
        "",
        f"{plan.requests} requests arrive at once (prompts 8-{plan.prompt_len} tokens, ~{plan.mean_len} generated), "
        f"max batch {plan.max_batch}. Ratios are against the dense model with static batching "
        "in the same round (median, spread over the rounds).",
        "",
        report.markdown_table(ENGINE_HEADER, _engine_lines(engine)),
        "",
        "## Figures",
        "",
    ]
    captions = {
        "pareto.png": "Quality vs speedup, one curve per strategy: up and to the right is better.",
        "depth_histogram.png": "How deep generated tokens went: mass on the left is compute saved.",
        "throughput.png": "Engine throughput by model and batching policy.",
    }
    lines += [f"![{f}]({f})\n\n{captions[f]}\n" for f in figs]
    lines += [
        "`sample.html`: one generation per model, each token coloured by its depth.",
        "",
        "## Time",
        "",
        ", ".join(f"{k} {fmt_seconds(v)}" for k, v in timings.items()),
        "",
    ]
    path = rep / "report.md"
    path.write_text("\n".join(lines))
    return path
