"""The main job: `earlyexit demo --quick` end to end (training, checks, measurements, report),
its cache, and `bench all`'s plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from earlyexit.demo import pipeline


def _demo(out, *extra):
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "demo", "--quick", "--json", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=1800,  # a backstop against a hang: ~20 s on 2 idle cores, minutes under load
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout), p.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, *_demo(out)


def test_demo_quick_trains_measures_and_reports(first_run):
    out, res, err = first_run
    assert res["reused"] == []
    models = {r["model"] for r in res["rows"]}
    assert models == {"dense", "recursive", "mor"}
    dense = {r["label"]: r for r in res["rows"] if r["model"] == "dense"}
    assert dense["full"]["rouge_l"] == 1.0 and dense["full"]["speedup"] == pytest.approx(
        1.0, rel=0.5
    )
    for label in ("static@1", "calm λ=0.5", "free λ=0.1", "free adaptive", "speculative k=2"):
        assert label in dense
    assert dense["speculative k=2"]["token_match"] == 1.0  # lossless by construction
    assert dense["static@1"]["mean_depth"] < dense["full"]["mean_depth"]
    rec = {r["label"] for r in res["rows"] if r["model"] == "recursive"}
    assert "loop exit static@2" in rec
    policies = {(e["model"], e["policy"]) for e in res["engine"]}
    assert ("dense", "static") in policies and ("mor", "depthwise") in policies
    assert all(e["tokens_per_s"] > 0 for e in res["engine"])
    if "skipped" not in res["parity"]:
        assert res["parity"]["greedy_tokens_identical"] and res["parity"]["max_logit_diff"] < 1e-4
    rep = out / "report"
    for f in ("report.md", "pareto.png", "depth_histogram.png", "throughput.png", "sample.html"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 500, f
    md = (rep / "report.md").read_text()
    assert "speculative k=2" in md and "depthwise" in md
    assert "## What this run shows" in md and "interleaved rounds" in md
    assert "CPU decode attention: " in md  # which attention the measurements ran on
    assert len(res["findings"]) >= 3 and all(f"- {f}" in md for f in res["findings"])
    html = (rep / "sample.html").read_text()
    assert html.count("title='depth ") > 10
    assert "expected to be gibberish" in html
    assert "model" in err and "tokens/s" in err  # the printed tables
    # the serving section states its exit threshold; the NLL says which tokens it is on
    assert "threshold λ = 0.3" in md and "tokens of the validation split" in md
    assert "paired standard error" in md and "router's gate" in md  # the MoR finding
    # the training log says auto chose the precision, not "as asked"
    assert "(as asked)" not in err and "precision: float32 (auto:" in err.replace(
        "bfloat16", "float32"
    )


def test_demo_second_run_reuses_every_stage(first_run):
    out, first, _ = first_run
    res, _ = _demo(out)
    assert set(res["reused"]) == {
        s.name for s in pipeline.stages(pipeline.QUICK, out, out / "data")
    }
    assert "training" in res["timings"] and res["timings"]["training"] < 5
    # the same cached models give the same validation NLL
    nll = {r["model"]: r["val_nll"] for r in first["rows"]}
    assert {r["model"]: r["val_nll"] for r in res["rows"]} == pytest.approx(nll)


def test_demo_stage_restarts_when_its_recipe_changes(tmp_path):
    st = pipeline.stages(pipeline.QUICK, tmp_path, tmp_path / "data")
    dense = st[0]
    run = tmp_path / "runs" / "dense-exits"
    run.mkdir(parents=True)
    import dataclasses

    (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(dense.cfg)))
    assert pipeline._same_recipe(run, dense.cfg)
    assert not pipeline._same_recipe(run, dataclasses.replace(dense.cfg, lr=1.0))
    assert not pipeline.is_done(dense)


def test_demo_rejects_a_missing_model(tmp_path):
    """It fails before writing anything: no work folder in the earlyexit home."""
    import os

    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "demo", "--quick", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=600,  # a backstop: start-up alone takes many seconds on a loaded machine
        env={**os.environ, "EARLYEXIT_HOME": str(tmp_path / "home")},
    )
    assert p.returncode == 1 and "not a model directory" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_bench_all_dry_run_lists_every_benchmark(capsys, tmp_path, monkeypatch):
    from earlyexit.cli import main

    monkeypatch.chdir(tmp_path)  # nothing trained here: the plan starts with training
    assert main(["bench", "all", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "earlyexit prepare --corpus stdlib --out data/stdlib"
    for name in (
        "decode",
        "early-exit",
        "batched-exit",
        "conversion",
        "mor-isoflop",
        "depthwise",
        "serve",
        "plot",
    ):
        assert any(line.startswith(f"earlyexit bench {name}") for line in lines), name
    assert main(["bench", "all", "--dry-run", "--skip", "nonsense"]) == 1


def test_demo_on_a_users_model(tiny_lm_dir, tmp_path):
    """A pretrained model without exits gets one, fine-tuned with its body frozen: its
    full-depth output stays the user's, and every exit strategy is measured on it."""
    import earlyexit

    res, log = _demo(tmp_path / "work", "--model", str(tiny_lm_dir))
    assert "your model's exit fine-tune takes" in log  # its own step timed, not scaled
    assert {r["model"] for r in res["rows"]} == {"user"}
    assert res["reused"] == [] and "train user-exit" in res["timings"]
    labels = {r["label"] for r in res["rows"]}
    assert {"full", "static@1", "free λ=0.1", "speculative k=2"} <= labels
    assert {e["policy"] for e in res["engine"]} == {"static", "continuous", "depthwise"}
    assert any(e["exit"] is not None for e in res["engine"])
    assert (tmp_path / "work" / "report" / "report.md").is_file()
    tuned = earlyexit.load(tmp_path / "work" / "runs" / "user-exit" / "final", device="cpu")
    source = earlyexit.load(tiny_lm_dir, device="cpu")
    for name, w in source.model.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], w), name
    # the measuring-time estimate counts the decodes the demo then ran: one per strategy
    # row and round (+ full depth once more), one engine run per job and round
    from earlyexit.demo.user_model import measure_tokens

    plan = pipeline.QUICK
    decodes, served = measure_tokens(plan, source.config, tuned.config.exits.steps[0])
    assert decodes == (len(labels) * plan.rounds + 1) * plan.prompts * plan.new_tokens
    assert served == len(res["engine"]) * plan.rounds * plan.requests * plan.mean_len
    again, _ = _demo(tmp_path / "work", "--model", str(tiny_lm_dir))
    assert again["reused"] == ["user-exit"]


def test_user_exit_probe_times_the_step_the_run_trains(tiny_lm_dir, tmp_path, monkeypatch):
    """The fine-tune's estimate comes from a step of the run itself: the user's model with
    the run's exit, only the exit's parameters trainable, the run's batch shape; nothing
    written."""
    seen = {}

    def timed(model, objective, batch_size, seq_len, precision):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        seen.update(
            trainable=trainable, exits=model.config.exits.steps, shape=(batch_size, seq_len)
        )
        return 0.25

    monkeypatch.setattr(pipeline, "_time_step", timed)
    up = pipeline.USER_EXIT_QUICK
    work = tmp_path / "work"
    stage = pipeline.user_exit_stage(pipeline.QUICK, up, tiny_lm_dir, work, work / "data")
    assert pipeline.probe_user_exit_step(stage) == 0.25
    assert seen["trainable"] and all(n.startswith("exit_") for n in seen["trainable"])
    assert tuple(seen["exits"]) == tuple(stage.cfg.exit_steps)
    assert seen["shape"] == (up.batch_size, up.seq_len)
    assert not work.exists()


def test_a_rebuilt_stage_rebuilds_the_stages_built_from_it(tmp_path, monkeypatch):
    """Dependants name their input by path, which does not change when the input is
    retrained: the pipeline must rebuild them anyway (and leave independent stages)."""
    st = pipeline.stages(pipeline.QUICK, tmp_path, tmp_path / "data")
    calls = []
    monkeypatch.setattr(pipeline, "_convert", lambda c: calls.append("recursive-init"))

    def fake_train(cfg, **k):
        calls.append(cfg.out.rsplit("/", 1)[-1])
        (tmp_path / "runs" / calls[-1] / "final").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr("earlyexit.training.loop.train", fake_train)
    for s in st:  # everything built, except that the dense stage's recipe changed
        s.final.mkdir(parents=True, exist_ok=True)
        if s.name != "dense-exits":
            pipeline._mark(s)
    _, _, reused = pipeline.build(st, progress=False, log=lambda *a: None)
    assert calls == ["dense-exits", "recursive-init", "recursive-uptrain", "recursive"]
    assert reused == ["mor"]


def test_stages_built_from_changed_weights_are_stale_across_runs(tmp_path, monkeypatch):
    """A dependant's stamp includes a digest of its inputs' weights: if the dense model's
    weights change behind its back (an interrupted earlier run, a manual retrain), the
    stages built from it are rebuilt on the next run, from scratch."""
    st = pipeline.stages(pipeline.QUICK, tmp_path, tmp_path / "data")
    calls = []

    def fake_convert(c):
        calls.append("recursive-init")
        Path(c["dst"]).mkdir(parents=True, exist_ok=True)
        (Path(c["dst"]) / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(pipeline, "_convert", fake_convert)

    def fake_train(cfg, **k):
        calls.append(cfg.out.rsplit("/", 1)[-1])
        final = tmp_path / "runs" / calls[-1] / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr("earlyexit.training.loop.train", fake_train)
    dense_w = tmp_path / "runs" / "dense-exits" / "final" / "model.safetensors"
    pipeline.build(st, progress=False, log=lambda *a: None)
    assert len(calls) == 5
    calls.clear()
    _, _, reused = pipeline.build(st, progress=False, log=lambda *a: None)
    assert calls == [] and len(reused) == 5  # nothing changed: everything reused
    dense_w.write_bytes(b"other weights")
    _, _, reused = pipeline.build(st, progress=False, log=lambda *a: None)
    assert calls == ["recursive-init", "recursive-uptrain", "recursive"]
    assert reused == ["dense-exits", "mor"]


def _row(label, speedup, rouge, curve="free", lo=None, hi=None, depth=5.0, rounds=3):
    return {
        "model": "dense",
        "label": label,
        "curve": curve,
        "speedup": speedup,
        "speedup_lo": speedup if lo is None else lo,
        "speedup_hi": speedup if hi is None else hi,
        "rounds": rounds,
        "rouge_l": rouge,
        "mean_depth": depth,
        "n_steps": 8,
    }


def _eng(label, model, policy, x, lo, hi, exit=None):
    return {
        "model_label": label,
        "model": model,
        "policy": policy,
        "exit": exit,
        "x_static": x,
        "x_static_lo": lo,
        "x_static_hi": hi,
        "rounds": 3,
        "mean_depth": 6.0,
    }


def test_report_findings_follow_the_numbers():
    from earlyexit.demo.report import findings

    rows = [
        _row("full", 1.0, 1.0, "full"),
        _row("a", 1.4, 0.995, lo=1.3, hi=1.45),
        _row("b", 2.0, 0.9, lo=1.9, hi=2.1),  # faster, but below the quality bar
    ]
    exit_ = {"step": 4, "threshold": 0.3}
    eng = [
        _eng("dense", "dense", "static", 1.0, 1.0, 1.0),
        _eng("rec", "recursive", "depthwise", 0.6, 0.55, 0.65, exit_),
    ]
    out = findings(rows, eng)
    assert "is a at 1.40x" in out[0] and "1.30-1.45x over 3 rounds" in out[0]
    assert any("did not pay" in f for f in out)
    assert "highest throughput was dense with static" in out[1]
    eng[1].update(x_static=1.3, x_static_lo=1.2, x_static_hi=1.4)
    out = findings(rows, eng)
    assert not any("did not pay" in f for f in out)
    assert "rec with depthwise" in out[1] and any("Per-token depth paid" in f for f in out)


def test_findings_refuse_what_the_measurement_does_not_support():
    """The --quick failure mode: a strategy that never exited "wins" at 3.58x (timing
    noise), and the serving winner changes from run to run."""
    from earlyexit.demo.report import findings, speedup_verdict

    never_exited = _row("free λ=0.5", 3.58, 1.0, lo=1.2, hi=3.9, depth=8.0)
    noisy = _row("calm", 1.2, 1.0, lo=0.8, hi=1.5)
    assert speedup_verdict(never_exited) == "unclear"  # its depth allows no speedup at all
    assert speedup_verdict(noisy) == "unclear"  # one round below 1
    tight_but_impossible = _row("x", 3.0, 1.0, lo=2.9, hi=3.1, depth=8.0)
    assert speedup_verdict(tight_but_impossible) == "unclear"
    assert speedup_verdict(_row("y", 1.5, 1.0, lo=1.45, hi=1.6, depth=4.0)) == "faster"
    assert speedup_verdict(_row("z", 0.8, 1.0, lo=0.75, hi=0.85)) == "slower"
    assert speedup_verdict(_row("one round", 1.5, 1.0, depth=4.0, rounds=1)) == "unclear"
    rows = [_row("full", 1.0, 1.0, "full"), never_exited, noisy]
    eng = [
        _eng("dense", "dense", "static", 1.0, 1.0, 1.0),
        _eng("dense", "dense", "continuous", 1.1, 0.9, 1.3),
    ]
    out = findings(rows, eng)
    assert "too short a run to tell" in out[0] and "more than its saved depth allows" in out[0]
    assert "cannot rank" in out[1]
    slow = [_row("full", 1.0, 1.0, "full"), _row("s", 0.7, 1.0, lo=0.65, hi=0.75)]
    assert "slower in every round" in findings(slow, [])[0]


def test_mor_finding_without_paired_tokens_gives_no_verdict():
    """The separate standard errors of two models scored on the same tokens are not the
    error of their difference: without the per-token comparison there is no verdict (the
    paired case is in test_report_stats)."""
    from earlyexit.demo.report import findings

    dense = {"nll": 3.20, "nll_se": 0.01}
    (line,) = findings([], [], {"dense": dense, "mor": {"nll": 3.10, "nll_se": 0.01}})
    assert line.startswith(
        "MoR: validation NLL 3.100 against the dense model's 3.200, trained here at equal "
        "training FLOPs (too few evaluation windows for an error bar: no verdict)."
    )
    assert "router's gate" in line


def test_serving_gain_from_exits_names_the_quality_it_cost():
    """Serving measures speed only: a "depth paid" finding for exits must bound its quality
    with the batch-1 rows of the same model that went as shallow (the --quick SmolLM2 run
    reported 1.18x from a 4-step exit that kept ROUGE-L 0.19)."""
    from earlyexit.demo.report import findings

    rows = [
        _row("full", 1.0, 1.0, "full", depth=8.0),
        _row("free λ=0.5", 1.1, 0.995, depth=6.5),
        _row("free λ=0.1", 1.6, 0.7, depth=3.0),
    ]
    exit_ = {"step": 2, "threshold": 0.3}
    base = _eng("dense", "dense", "static", 1.0, 1.0, 1.0)

    def paid(depth):
        e = _eng("dense + FREE exit", "dense", "continuous", 1.2, 1.1, 1.3, exit_)
        e["mean_depth"] = depth
        (line,) = [f for f in findings(rows, [base, e]) if "Per-token depth paid" in f]
        return line

    assert "above 0.995." in paid(7.0)  # as shallow as the λ=0.5 row: quality kept
    assert "above 0.700, below the 0.99 bar" in paid(3.5)  # only the λ=0.1 row went as shallow
    assert "no batch-1 row of this model went as shallow" in paid(2.0)
