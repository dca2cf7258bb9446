"""The main job: `earlyexit demo --quick` end to end (training, checks, measurements, report),
its cache, and `bench all`'s plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from earlyexit.demo import pipeline


def _demo(out, *extra):
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "demo", "--quick", "--json", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
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
    assert "## What this run shows" in md and "the fastest strategy that keeps ROUGE-L" in md
    html = (rep / "sample.html").read_text()
    assert html.count("title='depth ") > 10
    assert "model" in err and "tokens/s" in err  # the printed tables


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
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "demo", "--quick", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "not a model directory" in p.stderr


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
    res, _ = _demo(tmp_path / "work", "--model", str(tiny_lm_dir))
    assert {r["model"] for r in res["rows"]} == {"user"}
    assert res["reused"] == [] and "training" not in res["timings"]
    assert {e["policy"] for e in res["engine"]} == {"static", "continuous", "depthwise"}
    assert (tmp_path / "work" / "report" / "report.md").is_file()


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


def test_report_findings_follow_the_numbers():
    from earlyexit.demo.report import findings

    def row(label, speedup, rouge, curve="free"):
        return {
            "model": "dense",
            "label": label,
            "curve": curve,
            "speedup": speedup,
            "rouge_l": rouge,
            "mean_depth": 5.0,
            "n_steps": 8,
        }

    rows = [row("full", 1.0, 1.0, "full"), row("a", 1.4, 0.995), row("b", 2.0, 0.9)]
    eng = [
        {
            "model_label": "dense",
            "model": "dense",
            "policy": "static",
            "exit": None,
            "x_static": 1.0,
        },
        {
            "model_label": "rec",
            "model": "recursive",
            "policy": "depthwise",
            "exit": {"step": 4, "threshold": 0.3},
            "x_static": 0.6,
        },
    ]
    out = findings(rows, eng)
    assert "is a at 1.40x" in out[0]  # b is faster but below the quality bar
    assert any("did not pay" in f for f in out)
    eng[1]["x_static"] = 1.3
    out = findings(rows, eng)
    assert not any("did not pay" in f for f in out) and "rec with depthwise" in out[1]
