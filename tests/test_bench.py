"""The decode benchmark harness runs, checks outputs identical, and writes its JSON rows."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_decode_tiny(tmp_path, capsys):
    from earlyexit.bench.decode import main

    out = tmp_path / "decode.json"
    rows = main(
        preset="tiny",
        batch_sizes=[1, 3],
        new_tokens=8,
        prompt_len=5,
        repeats=2,
        threads=1,
        out=str(out),
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    summaries = [r for r in rows if r["impl"] == "summary"]
    assert [s["batch_size"] for s in summaries] == [1, 3]
    assert all(s["outputs_identical"] for s in summaries)
    assert (
        summaries[0]["fraction_of_bandwidth_bound"] > 0 and summaries[0]["copy_bandwidth_GBps"] > 0
    )
    for r in rows:
        if r["impl"] in ("earlyexit", "transformers"):
            assert len(r["seconds"]) == 2 and r["tokens_per_s"] > 0
    assert "| 1 |" in capsys.readouterr().out


def test_bench_early_exit_and_batched_exit_and_plots(exit_setup, tmp_path, monkeypatch):
    from earlyexit.bench import early_exit, plots

    monkeypatch.setattr(early_exit, "FREE_SWEEP", (0.05, 1.0))
    monkeypatch.setattr(early_exit, "CALM_SWEEP", (0.05,))
    monkeypatch.setattr(early_exit, "DRAFT_SWEEP", (2,))
    rows = early_exit.main_early_exit(
        str(exit_setup / "model"),
        str(exit_setup / "data"),
        n_prompts=3,
        prompt_len=8,
        new_tokens=6,
        repeats=1,
        threads=1,
        out=str(tmp_path / "early_exit.json"),
    )
    by = {r["label"]: r for r in rows}
    assert set(by) == {
        "static@1",
        "static@2",
        "free λ=0.05",
        "free λ=1.0",
        "free adaptive",
        "calm λ=0.05",
        "speculative k=2",
    }
    assert by["free λ=1.0"]["identical"] and by["free λ=1.0"]["exit_rate"] == 0
    assert by["speculative k=2"]["identical"] and by["speculative k=2"]["rouge_l"] == 1.0
    assert by["static@1"]["mean_depth"] < 2 and all(r["speedup"] > 0 for r in rows)
    rows = early_exit.main_batched_exit(
        str(exit_setup / "model"),
        str(exit_setup / "data"),
        batch_sizes=(1, 4),
        threshold=0.05,
        n_prompts=4,
        prompt_len=8,
        new_tokens=6,
        repeats=1,
        threads=1,
        out=str(tmp_path / "batched_exit.json"),
    )
    assert {(r["variant"], r["batch_size"]) for r in rows} == {
        (v, b)
        for v in ("full", "naive", "ours", "ours-nofb", "ours-per-row", "ours-per-row-nofb")
        for b in (1, 4)
    }
    stats = {r["variant"]: r["stats"] for r in rows if r["batch_size"] == 4}
    assert stats["ours"]["sync_batch"] and not stats["ours-per-row"]["sync_batch"]
    assert stats["ours-nofb"]["fallback"] is None is stats["ours-per-row-nofb"]["fallback"]
    # a single row has nothing to synchronize: the batch fallback never triggers there
    one = {r["variant"]: r for r in rows if r["batch_size"] == 1}
    assert one["ours"]["stats"]["fallback"] is None
    # ... and rows exiting together is each row's own decision: all four FREE runs agree
    assert len({one[v]["mean_depth"] for v in one if v.startswith("ours")}) == 1
    assert all(r["identical"] for r in rows if r["variant"] == "full")
    made = plots.plot_all(tmp_path, tmp_path / "plots")
    assert {p.name for p in made} == {"pareto.png", "batched_exit.png"}
    assert all(p.stat().st_size > 1000 for p in made)


def test_bench_depthwise_tiny(exit_setup, tmp_path):
    from earlyexit.bench import depthwise, plots
    from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
    from earlyexit.models.recursive import convert_recursive

    dense, tok = load_checkpoint(exit_setup / "model")
    rec = convert_recursive(make_plain(dense), 2)
    rec.config.exits.steps = (2,)
    save_checkpoint(rec, tmp_path / "rec", tok)
    stream = depthwise.request_stream(str(exit_setup / "data"), n=6, mean_len=8)
    assert len(stream) == 6 and all(16 <= g <= 256 for _, g in stream)
    rows = depthwise.run(
        str(exit_setup / "model"),
        str(tmp_path / "rec"),
        str(exit_setup / "data"),
        exit_model=str(exit_setup / "model"),
        threshold=0.05,
        n_requests=6,
        max_batch=(2, 4),
        threads=1,
        out=str(tmp_path / "dw.json"),
        mean_len=8,
        deep_kvs=("catch-up", "skip"),
        repeats=2,
        exit_vocab=64,
    )
    labels = [r["label"] for r in rows]
    assert "recursive + loop exit (skip, v64), depth-wise batching" in labels
    assert all(len(r["seconds_all"]) == 2 for r in rows)
    # quality beside speed: full depth is the same tokens under every batching policy (the
    # reference is the same model's continuous run); exits are scored against it
    for r in rows:
        assert "rouge_l" in r, r["label"]
        if r["exit"] is None:
            assert r["identical"] and r["rouge_l"] == 1.0, r["label"]
    assert {r["exit_vocab"] for r in rows if r["exit"]} == {None, 64}
    (tmp_path / "depthwise_smollm2.json").write_text((tmp_path / "dw.json").read_text())
    made = plots.plot_all(tmp_path, tmp_path / "plots")
    assert [p.name for p in made] == ["depthwise_smollm2.png"] and made[0].stat().st_size > 1000
    assert (
        "recursive + loop exit, depth-wise batching" in labels
        and "naive dense early exit, static batch" in labels
    )
    assert [r["tokens"] for r in rows] == [sum(g for _, g in stream)] * len(rows), [
        r["tokens"] for r in rows
    ]
    # one group per max batch, ratios within each
    assert [r["max_batch"] for r in rows] == [2] * (len(rows) // 2) + [4] * (len(rows) // 2)
    for r in rows:
        if r["label"] == "vanilla, static batching":
            assert r["x_vanilla_static"] == 1.0


def make_plain(model):
    """The same weights without exit configuration (conversion keeps exits otherwise)."""
    import dataclasses

    from earlyexit.config import ExitConfig
    from earlyexit.models.decoder import Decoder

    plain = Decoder(dataclasses.replace(model.config, exits=ExitConfig()))
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def test_bench_serve_tiny(exit_setup, tmp_path):
    pytest.importorskip("uvicorn")
    from earlyexit.bench import serve_load

    rows = serve_load.run(
        str(exit_setup / "model"),
        str(exit_setup / "data"),
        clients=4,
        n_requests=8,
        threshold=0.05,
        max_batch=4,
        threads=1,
        out=str(tmp_path / "serve.json"),
        mean_len=8,
    )
    r = rows[0]
    assert r["failed"] == 0 and r["ratio"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0


def test_bench_mor_isoflop_tiny(exit_setup, tmp_path, monkeypatch):
    import json as _json

    from earlyexit.bench import isoflop
    from earlyexit.training import loop

    base = dict(
        seq_len=16, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, device="cpu"
    )
    cfgs = {
        "dense": {
            "name": "d",
            "vocab_size": 300,
            "d_model": 32,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_ff": 64,
            "max_context": 64,
        },
    }
    cfgs["mor"] = {
        **cfgs["dense"],
        "sharing": {"scheme": "middle_cycle", "loops": 2},
        "router": {"kind": "expert"},
    }
    for k, v in cfgs.items():
        (tmp_path / f"{k}.json").write_text(_json.dumps(v))
    budget = 3 * 2 * 16 * 1e5
    monkeypatch.setitem(
        loop.RECIPES,
        "t-dense",
        dict(
            model=str(tmp_path / "dense.json"),
            out=str(tmp_path / "dense"),
            flops_budget=budget,
            **base,
        ),
    )
    monkeypatch.setitem(
        loop.RECIPES,
        "t-mor",
        dict(
            model=str(tmp_path / "mor.json"), out=str(tmp_path / "mor"), flops_budget=budget, **base
        ),
    )
    monkeypatch.setattr(isoflop, "RUNS", (("dense", "t-dense"), ("mor", "t-mor")))
    rows = isoflop.run(str(exit_setup / "data"), threads=1, out=str(tmp_path / "iso.json"))
    d, m = rows
    assert m["steps"] > d["steps"]  # MoR is cheaper per token: more steps for the same FLOPs
    assert abs(d["compute_budget"] - m["compute_budget"]) / d["compute_budget"] < 0.2
    assert "val_nll_topk_noncausal" in m and len(m["recursion_shares_causal"]) == 2


@pytest.mark.slow
def test_bench_decode_with_the_compiled_step(tmp_path):
    from earlyexit.bench.decode import COMPILED, main

    rows = main(
        preset="tiny",
        batch_sizes=[2],
        new_tokens=6,
        prompt_len=4,
        repeats=1,
        threads=1,
        out=str(tmp_path / "d.json"),
        compile=True,
    )
    summary = next(r for r in rows if r["impl"] == "summary")
    assert summary["compiled_outputs_identical"] and summary["compiled_speedup_vs_transformers"] > 0
    assert any(r["impl"] == COMPILED for r in rows)


def test_bench_depthwise_calls_tiny(tmp_path, capsys):
    from earlyexit.cli import main
    from earlyexit.models import decode_kernel

    out = tmp_path / "calls.json"
    argv = ["bench", "depthwise", "--calls", "--preset", "tiny", "--batch-sizes", "2", "4"]
    argv += ["--lengths", "8", "--repeats", "2", "--threads", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["rows"], r["length"]) for r in rows] == [(2, 8), (4, 8)]
    assert all(r["plain_s"] > 0 and r["mixed_s"] > 0 and r["gathered_s"] > 0 for r in rows)
    assert all(r["plain_sdpa_s"] > 0 for r in rows)  # the plain call's ablation
    kernel = decode_kernel.load() is not None
    assert {r["mode"] for r in rows} == {"kernel" if kernel else "per-slot"}
    assert "mixed" in capsys.readouterr().out
    from earlyexit.bench import plots

    assert plots.calls(rows, tmp_path / "c.png").stat().st_size > 1000


def test_bench_depthwise_synthetic_tiny(tmp_path):
    from earlyexit.bench.depthwise import run_synthetic

    rows = run_synthetic(
        presets=("tiny",),
        max_batches=(4,),
        exit_rates=(0.0, 1.0),
        n_requests=6,
        mean_len=4,
        max_prompt=8,
        threads=1,
        out=str(tmp_path / "s.json"),
        repeats=2,
    )
    assert all(len(r["seconds_all"]) == 2 for r in rows)
    by = {(r["model"], r["policy"], r["decisions"]): r for r in rows}
    full = by[("recursive", "depthwise", "exit 0%")]
    exited = by[("recursive", "depthwise", "exit 100%")]
    assert full["mean_depth"] > exited["mean_depth"]  # every generated token after the first exits
    assert by[("vanilla", "continuous", "vanilla")]["x_vanilla_continuous"] == 1.0
    assert {r["tokens"] for r in rows} == {rows[0]["tokens"]}
    assert ("mor", "depthwise", "MoR 1/3") in by
    from earlyexit.bench import plots

    assert plots.synthetic(rows, tmp_path / "s.png").stat().st_size > 1000


def test_early_exit_grid_overrides_the_swept_values(exit_setup):
    """A real model's sweep runs a smaller grid: the override replaces each list, and only it."""
    from earlyexit import load
    from earlyexit.bench.early_exit import _configs

    model = load(str(exit_setup / "model")).model
    grid = {"free": (0.3,), "calm": (), "draft": (3,)}
    labels = [label for label, _, _ in _configs(model, grid=grid)]
    assert labels == ["static@1", "static@2", "free λ=0.3", "free adaptive", "speculative k=3"]


def test_synthetic_models_take_the_benchmark_dtype():
    """`bench depthwise --synthetic --dtype bfloat16` (the GPU run) measures bf16 weights."""
    import torch

    from earlyexit.bench.depthwise import synthetic_models

    models = synthetic_models("tiny", dtype="bfloat16")
    assert {p.dtype for m in models.values() for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in synthetic_models("tiny")["mor"].parameters()} == {torch.float32}


def test_serve_strategies_generation_lengths_are_seeded_spread_and_clipped():
    """The serving workload of benchmarks.md: lengths drawn from a seeded distribution, so
    rows of one strategy do not finish in lockstep; ``sd=0`` is the old equal-length one."""
    from earlyexit.bench.serve_strategies import generation_lengths

    a = generation_lengths(200, 64, seed=3)
    assert a == generation_lengths(200, 64, seed=3)  # seeded: every strategy gets the same
    assert a != generation_lengths(200, 64, seed=4)
    assert min(a) >= 16 and max(a) <= 128 and len(set(a)) > 20  # spread, clipped
    assert abs(sum(a) / len(a) - 64) < 4
    assert generation_lengths(5, 64, sd=0) == [64] * 5
    with pytest.raises(ValueError, match="sd >= 0"):
        generation_lengths(5, 64, sd=-1)
