"""Progress without a terminal: one line per interval with the count, the rate and an ETA
(a bar only on a terminal), and the demo's time estimate from a measured training step."""

import os
import subprocess
import sys

import pytest

from earlyexit.progress import Progress, fmt_seconds
from tests.test_training import _cli_train, make_setup


def test_lines_in_a_log_report_count_rate_and_eta(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("earlyexit.progress.time.perf_counter", lambda: now[0])
    lines = []
    p = Progress(10, "train run", log=lines.append, tty=False, every_s=25)
    for i in range(10):
        now[0] += 10.0  # each step takes 10 s
        p.update(1, loss=f"{3 - i * 0.1:.1f}")
    p.close()
    # the first update, then a line once 25 s have passed since the last one, and the last
    assert [ln.split(",")[0] for ln in lines] == [
        f"train run: {i}/10 steps ({i * 10}%)" for i in (1, 4, 7, 10)
    ]
    assert lines[0] == "train run: 1/10 steps (10%), loss 3.0, 0.10 step/s, ETA 1.5 min"
    assert lines[-1] == "train run: 10/10 steps (100%), loss 2.1, 0.10 step/s"


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (42, 200, 7200)] == ["42 s", "3.3 min", "2.0 h"]


def test_train_piped_to_a_log_prints_progress_lines_and_precision(tmp_path_factory):
    """`earlyexit train > log 2>&1`: no terminal, so periodic lines instead of a bar, and
    the first lines say which precision it trains in and why."""
    setup = make_setup(tmp_path_factory.mktemp("progress"))
    out = tmp_path_factory.mktemp("run") / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EARLYEXIT_PROGRESS_EVERY": "0"}
    args = [a for a in _cli_train(setup, out) if a != "--no-progress"]
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "train", *args, "--steps", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    err = p.stderr
    assert "precision: float32" in err or "precision: bfloat16" in err
    steps = [ln for ln in err.splitlines() if ln.startswith("train r: ")]
    assert [s.split(",")[0] for s in steps] == [
        f"train r: {i}/4 steps ({i * 25}%)" for i in (1, 2, 3, 4)
    ]
    assert all("tokens_per_s" in s for s in steps) and "\r" not in err


def test_demo_estimate_is_scaled_by_the_measured_step_and_revised():
    from earlyexit.demo import pipeline

    plan = pipeline.QUICK
    step_s = pipeline.probe_step_seconds(plan)
    assert 0 < step_s < 60
    est = pipeline.Estimate(plan, 2.0)
    st = pipeline.Stage("dense-exits", "dense", eta_key="dense", steps=10)
    first = est.stage(st)
    assert first == pytest.approx(est.STAGE_OVERHEAD_S + 10 * 2.0)
    # the stage took twice as long as predicted: everything after it is revised to match
    measure = est.measure()
    est.stage_done(st, 2 * first)
    assert est.scale == pytest.approx(2.0) and est.measure() == pytest.approx(2 * measure)
