"""``earlyexit demo``: the main job, end to end on this machine with no downloads.

1. prepares the corpus (the running interpreter's standard library);
2. trains, or reuses from the cache directory, a dense model with exits, its relaxed
   recursive conversion (uptrained, with a loop exit) and a Mixture-of-Recursions model
   (``pipeline.py``); checks the dense model against ``transformers`` on the same weights;
3. decodes validation prompts with every strategy each model serves, and drives the engine
   with a request stream under each batching policy (``evaluate.py``);
4. prints one table and writes the report folder (``report.py``).

``--model DIR`` (a named model like ``smollm2``, or a Hugging Face hub name, downloaded when
online) replaces step 2: an exit is fine-tuned on the model's frozen body (unless it has
trained exits), then steps 3-4 measure it.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from earlyexit.demo.output import (
    ENGINE_HEADER,
    engine_lines,
    figures,
    sample_generations,
    sample_note,
    write_report,
)
from earlyexit.demo.user_model import (
    check_model_arg,
    check_parity,
    draft_tokens,
    has_trained_exits,
    model_exit_step,
    user_checkpoint,
    user_tokenizer,
)
from earlyexit.demo.user_model import measure_seconds as user_measure_seconds
from earlyexit.files import home
from earlyexit.progress import fmt_seconds
from earlyexit.progress import progress as progress_bar


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
    work = Path(out_dir).expanduser() if out_dir else home() / ("demo-quick" if quick else "demo")
    if model:
        check_model_arg(model)  # a model that is not there fails before anything is written
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

    model_dir = user_checkpoint(model, work) if model else None  # resolved (downloaded) once
    user_tok = user_tokenizer(model_dir) if model_dir else None
    data = work / ("data" if user_tok is None else "data-user")
    data_ready = (data / "manifest.json").is_file()
    if model:  # a pretrained model: an exit fine-tune if it has none (its body frozen)
        up = pipeline.USER_EXIT_QUICK if quick else pipeline.USER_EXIT_FULL
        st = (
            []
            if has_trained_exits(model_dir)
            else [
                pipeline.user_exit_stage(
                    plan, up, model_dir, work, data, threads, str(dev), precision
                )
            ]
        )
    else:
        st = pipeline.stages(plan, work, data, threads, device=str(dev), precision=precision)
    todo = [s for s in st if not pipeline.is_done(s)]
    # the estimate comes from one training step timed here, now (a few seconds at most)
    step_s = pipeline.probe_step_seconds(plan, str(dev), train_precision)
    user_step_s = None
    user_stage = next((s for s in todo if s.name == "user-exit"), None)
    if user_stage is not None:  # a user model's fine-tune: its own step, timed
        user_step_s = pipeline.probe_user_exit_step(user_stage)
        st = [
            dataclasses.replace(s, cost=user_step_s / step_s) if s.name == "user-exit" else s
            for s in st
        ]
        todo = [s for s in st if not pipeline.is_done(s)]
    measure_s = None
    if model:  # a model unlike the demo's own: its measurements timed from its decode speed
        exit_at = model_exit_step(model_dir, up)
        measure_s = user_measure_seconds(plan, model_dir, exit_at, str(dev))
    est = pipeline.Estimate(plan, step_s, measure_s)
    eta = (0 if data_ready else est.data()) + sum(est.stage(s) for s in todo) + est.measure()
    say(
        f"plan: {'reuse every cached model' if not todo else f'train {len(todo)} stage(s)'}, "
        f"then measure. One training step of "
        + (
            f"the dense model takes {est.step_s:.2f} s here"
            if user_step_s is None
            else f"your model's exit fine-tune takes {user_step_s:.2f} s here"
        )
        + f": expected time ~{fmt_seconds(eta)} (revised as stages finish)"
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
    from earlyexit.evaluation.metrics import validation_prompts
    from earlyexit.evaluation.perplexity import perplexity
    from earlyexit.training.data import token_file

    t = time.perf_counter()
    say(f"[measure] expected ~{fmt_seconds(est.measure())}")
    lms = {k: earlyexit.load(p, device=dev, dtype=dtype) for k, p in paths.items()}
    parity = check_parity(paths.get("dense") or paths["user"], work / "hf-export")
    if "skipped" in parity:
        say(f"[check] transformers parity skipped: {parity['skipped']}")
    else:
        say(
            f"[check] exported to Hugging Face format and reloaded with transformers: max |logit diff| "
            f"{parity['max_logit_diff']:.1e}, greedy tokens identical: {parity['greedy_tokens_identical']}"
        )
    # the windows the training log's final `val nll` scores (eval_batches x batch_size), the
    # same tokens for every model; per-token NLLs kept for the paired MoR-dense comparison
    evals = {
        k: perplexity(
            p,
            data,
            seq_len=plan.seq_len,
            batch_size=plan.batch_size,
            max_batches=plan.eval_batches,
            device=str(dev),
            dtype=dtype,
            token_nll=True,
        )
        for k, p in paths.items()
    }
    per_token = {k: v.pop("token_nll") for k, v in evals.items()}
    if "mor" in evals and "dense" in evals:
        evals["mor"]["vs_dense"] = report.nll_comparison(
            per_token["mor"], per_token["dense"], plan.seq_len
        )
    nll = {k: v["nll"] for k, v in evals.items()}
    prompts = validation_prompts(data, plan.prompts, plan.prompt_len)
    jobs = []
    for k, lm in lms.items():
        if k == "recursive":
            jobs.append((k, lm, recursive_configs(lm.model)))
        elif k != "mor":
            jobs.append((k, lm, dense_configs(lm.model, draft_tokens(lm, data))))
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

    samples = sample_generations(lms, data)
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
    say("\n" + report.text_table(ENGINE_HEADER, engine_lines(engine)))
    found = report.findings(rows, engine, evals)
    figs = figures(rows, depths, engine, rep, say)
    report_md = write_report(
        rep, plan, quick, paths, rows, engine, parity, evals, timings, reused, figs, threads, found
    )
    if samples:
        report.sample_html(
            samples["prompt"],
            samples["items"],
            rep / "sample.html",
            note=sample_note(lms, trained_here=not model),
        )
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
