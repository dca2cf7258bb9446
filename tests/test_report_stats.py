"""The demo report's statistics, computed once and shown the same everywhere (issue 33 item 2,
issue 31 item 5): every expected value below is worked out by hand in the comments, never
taken from the code under test."""

import math

import pytest

from earlyexit.bench import plots
from earlyexit.demo import output, report
from earlyexit.demo.evaluate import engine_row
from earlyexit.demo.stats import fmt_ratio, paired_se, ratio_summary, ratio_verdict
from tests.test_demo import _row as _demo_row

# Two models' per-token NLLs on the same four tokens; the hard tokens are hard for both.
A = [2.0, 3.0, 4.0, 6.0]  # mean 3.75
B = [1.0, 2.5, 3.0, 4.5]  # mean 2.75


def test_paired_se_by_hand():
    # d = A - B = [1, 0.5, 1, 1.5]; mean 1.0; squared deviations 0, .25, 0, .25 -> sample
    # variance 0.5 / 3; SE = sqrt(0.5 / 3 / 4) = 0.2041241
    assert paired_se(A, B) == pytest.approx(math.sqrt(0.5 / 3 / 4), abs=1e-12)
    assert paired_se(A, B) == pytest.approx(0.2041241, abs=1e-7)
    # windows of 2 tokens as the units: means [0.75, 1.25]; sample variance 0.125;
    # SE = sqrt(0.125 / 2) = 0.25
    assert paired_se(A, B, cluster=2) == pytest.approx(0.25, abs=1e-12)
    # the combined independent SEs the report used to give: A's sample variance 8.75 / 3,
    # B's 6.25 / 3 -> sqrt(8.75/12 + 6.25/12) = sqrt(1.25) = 1.118: five times the paired one
    combined = math.sqrt(8.75 / 12 + 6.25 / 12)
    assert combined == pytest.approx(1.1180340, abs=1e-7)
    assert paired_se(A, B) < combined / 5
    # identical models: no difference, no error
    assert paired_se(A, A) == 0.0


def test_paired_se_refuses_what_is_not_paired():
    with pytest.raises(ValueError, match="same tokens"):
        paired_se(A, B[:3])
    with pytest.raises(ValueError, match="divide"):
        paired_se(A, B, cluster=3)
    assert paired_se(A, B, cluster=4) is None  # one unit: no spread to measure


def test_ratio_is_the_median_of_per_round_ratios():
    # rounds: baseline 100, 200, 100 tok/s; the job 90, 210, 120 tok/s
    # per-round ratios 0.90, 1.05, 1.20 -> median 1.05, spread 0.90-1.20
    # (the ratio of the medians, 120 / 100 = 1.20, is what the figure used to show)
    got = ratio_summary([90, 210, 120], [100, 200, 100])
    assert got == pytest.approx({"median": 1.05, "lo": 0.90, "hi": 1.20, "rounds": 3})
    assert fmt_ratio(1.05, 0.9, 1.2) == "1.05x (0.90-1.20)"
    assert fmt_ratio(1.05) == "1.05x"
    with pytest.raises(ValueError):
        ratio_summary([1.0], [1.0, 2.0])


def test_noise_band_is_three_percent():
    assert ratio_verdict(1.031, 1.2) == "above"
    assert ratio_verdict(1.01, 1.11) == "within noise"  # one round inside ±3%
    assert ratio_verdict(0.98, 1.02) == "within noise"
    assert ratio_verdict(0.5, 0.969) == "below"
    assert ratio_verdict(0.5, 0.98) == "within noise"


def _run(tps):
    return {
        "tokens_per_s": tps,
        "seconds": 100.0 / tps,
        "tokens": 100,
        "mean_depth": 8.0,
        "depths": [8] * 4,
        "occupancy": {"mean_rows_per_block_call": 3.0},
    }


def _engine():
    base = [_run(100.0), _run(200.0), _run(100.0)]
    job = [_run(90.0), _run(210.0), _run(120.0)]
    return [
        engine_row(("dense", "dense", "static", None), base, base),
        engine_row(("dense", "dense", "continuous", None), job, base),
    ]


def _figure(monkeypatch, fn, *args):
    """Draw with ``fn`` and hand back the figure instead of writing it."""
    figs = []
    keep = lambda fig, out: figs.append(fig) or out  # noqa: E731
    monkeypatch.setattr(report, "save", keep)
    monkeypatch.setattr(plots, "save", keep)  # the quality-vs-speed chart is drawn there
    fn(*args, "unused.png")
    return figs[0]


def test_throughput_table_and_figure_show_the_same_ratio(monkeypatch):
    pytest.importorskip("matplotlib")
    engine = _engine()
    lines = output.engine_lines(engine)
    assert lines[1][2] == "120"  # median tokens/s of 90, 210, 120
    assert lines[1][3] == "1.05x (0.90-1.20)"  # not the ratio of medians, 120 / 100 = 1.20x
    fig = _figure(monkeypatch, report.throughput, engine)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["1.00x", "1.05x"]
    bars = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert bars == [1.0, 1.05]
    # the spread is drawn: an error bar from 0.90 to 1.20 at the continuous bar
    assert (0.9, 1.2) in _spans(ax, 1)


def _row(label, speedup, rouge, curve="free", lo=None, hi=None, depth=6.0):
    """A demo row (``tests/test_demo.py``'s) with the fields the pareto figure and the
    findings read too."""
    row = _demo_row(label, speedup, rouge, curve, lo, hi, depth)
    return {**row, "speedup_vs": "full depth", "token_match": rouge, "val_nll": 3.0}


def _spans(ax, axis: int) -> list[tuple[float, float]]:
    """The two-point segments (error bars) drawn on ``ax``, along x (0) or y (1)."""
    return [
        tuple(round(v, 6) for v in seg[:, axis])
        for c in ax.collections
        for seg in c.get_segments()
        if len(seg) == 2
    ]


def test_pareto_clips_an_outlier_and_draws_spreads_without_hiding_full_depth(monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [
        _row("full", 1.0, 1.0, "full", depth=8.0),
        _row("free λ=0.5", 0.90, 1.0, lo=0.85, hi=0.95),
        _row("free λ=0.2", 0.95, 1.0, lo=0.90, hi=1.00),
        _row("free λ=0.1", 1.00, 0.99),
        _row("calm λ=0.5", 1.02, 0.99, "calm"),
        _row("calm λ=0.2", 1.05, 0.98, "calm"),
        _row("static@2", 3.14, 0.70, "static", lo=2.90, hi=3.30, depth=2.0),
    ]
    fig = _figure(monkeypatch, report.pareto, rows)
    ax = fig.axes[0]
    # speedups 0.90 0.95 1.00 1.02 1.05 3.14: quartiles (linear) 0.9625 and 1.0425, IQR
    # 0.08, fence 1.0425 + 1.5 x 0.08 = 1.1625; the axis ends 2% beyond it
    assert ax.get_xlim()[1] == pytest.approx(1.1625 * 1.02)
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["static@2: 3.14x (2.90-3.30)"]  # the clipped point keeps its value
    # no marker sits on (1, 1): full depth is a dotted crosshair, drawn behind the points
    (full,) = [h for h in ax.lines if "full depth" in str(h.get_label())]
    assert full.get_marker() in (None, "None", "", " ") and full.get_zorder() == 0
    assert not [h for h in ax.lines if h.get_marker() == "*"]
    # spreads drawn: the λ=0.5 point's bar runs 0.85-0.95
    assert (0.85, 0.95) in _spans(ax, 0)


def test_a_speedup_inside_the_noise_band_is_not_a_finding():
    # the case: 1.02x with rounds 1.01-1.11 at ROUGE-L 1.0
    rows = [
        _row("full", 1.0, 1.0, "full", depth=8.0),
        _row("loop exit free λ=0.2", 1.02, 1.0, lo=1.01, hi=1.11),
    ]
    out = report.findings(rows, [])
    assert "fastest" not in out[0] and "±3% timing noise" in out[0]
    rows[1].update(speedup=1.06, speedup_lo=1.04)  # every round above 1.03: a speedup
    assert "the fastest strategy" in report.findings(rows, [])[0]


def test_mor_finding_uses_the_paired_standard_error_and_carries_the_caveat():
    # MoR = A, dense = B scored on the same 4 tokens in 2 windows of 2: difference +1.000,
    # paired SE 0.250 (test_paired_se_by_hand), 4.0 standard errors
    vs = report.nll_comparison(A, B, seq_len=2)
    assert vs == pytest.approx(
        {"diff": 1.0, "paired_se": 0.25, "tokens": 4, "windows": 2, "seq_len": 2}
    )
    mor = {"nll": 3.75, "nll_se": 1.0, "vs_dense": vs}
    (line,) = report.findings([], [], {"mor": mor, "dense": {"nll": 2.75, "nll_se": 1.0}})
    assert line.startswith(
        "MoR: validation NLL 3.750 against the dense model's 2.750 on the same 4 validation "
        "tokens, trained here at equal training FLOPs: higher by 1.000, 4.0 times its "
        "standard error (paired standard error 0.250: the standard error of the mean "
        "per-token NLL difference, both models scored on the same tokens, each 2-token "
        "window one unit)."
    )
    assert "router's gate" in line and "exit loss" in line  # the ablation's caveat
    # a difference of 1.5 paired SEs is no verdict
    vs2 = dict(vs, diff=0.375)
    (line,) = report.findings([], [], {"mor": dict(mor, vs_dense=vs2), "dense": {"nll": 2.75}})
    assert "within twice its standard error" in line and "+0.375" in line


def test_serving_section_states_the_exit_threshold():
    engine = _engine()
    engine[1].update(model_label="dense + FREE exit", exit={"step": 2, "threshold": 0.3})
    text = output.serving_exits(engine)
    assert "dense + FREE exit: exit after step 2, threshold λ = 0.3" in text
    assert "No configuration exits" in output.serving_exits(_engine())


def test_model_table_says_which_tokens_its_nll_is_on():
    class Plan:
        seq_len = 256

    evals = {"dense": {"nll": 3.8, "nll_se": 0.1, "tokens": 65536, "windows": 256, "seq_len": 256}}
    text = "\n".join(output.nll_lines({"dense": "runs/d"}, evals, Plan, user=False))
    assert "| dense + exits | `runs/d` | 3.800 ± 0.100 |" in text
    assert "first 65,536 tokens of the validation split (256 windows of 256 tokens)" in text
    assert "training log's final `val nll`" in text


def test_sample_page_says_tiny_models_write_gibberish(tmp_path):
    out = report.sample_html(
        "def f(",
        [{"title": "t", "pieces": [("x", 1)], "n_steps": 2}],
        tmp_path / "s.html",
        note="expected to be gibberish",
    )
    page = out.read_text()
    assert page.index("expected to be gibberish") < page.index("<h2>")


def test_axis_limit_clips_only_a_far_outlier():
    from earlyexit.bench.plots import axis_limit

    # quartiles of 0.90 0.95 1.00 1.02 1.05 x: 0.9625 and 1.0425 -> fence 1.1625
    assert axis_limit([0.9, 0.95, 1.0, 1.02, 1.05, 3.14]) == pytest.approx(1.1625)
    assert axis_limit([0.9, 0.95, 1.0, 1.02, 1.05, 1.2]) is None  # within 15% of the fence
    assert axis_limit([0.9, 1.0, 1.05, 9.0]) is None  # too few points to call one an outlier
