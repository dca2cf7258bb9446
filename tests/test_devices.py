"""Devices and precision: the static (compilable) decode step equals the general path,
bf16 agrees with fp32 within a stated tolerance, bad device requests are one-line errors,
and the CUDA paths (``pytest -m gpu`` on a GPU machine; skipped here, never broken)."""

import numpy as np
import pytest
import torch

from earlyexit.config import LoraConfig
from earlyexit.decoding.full import FullDepth
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.errors import ConfigError
from earlyexit.models.kv_cache import KVCache
from earlyexit.models.recursive import convert_recursive
from earlyexit.models.static_decode import StaticDecodeStep, static_unsupported
from earlyexit.training.config import TrainConfig
from tests.conftest import make_model

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 2, 7, 1], [3], [100, 200, 300, 400, 8, 9, 10, 11], [42, 43]]


def _models():
    dense = make_model(n_layers=4)
    relaxed = convert_recursive(make_model(n_layers=4), 2, lora=LoraConfig(rank=4))
    # relaxed norms and biases too (per-step offsets of a source with every bias)
    biased = make_model(n_layers=4, qkv_bias=True, o_bias=True, mlp_bias=True)
    opts = LoraConfig(rank=4, norms=True, biases=True)
    relaxed_nb = convert_recursive(biased, 2, lora=opts)
    for m in (relaxed, relaxed_nb):
        with torch.no_grad():  # make the LoRA deltas and offsets non-zero so they matter
            for name, p in m.named_parameters():
                if ".lora." in name:
                    p.normal_(0, 0.05)
    return {
        "dense": dense,
        "relaxed recursive": relaxed.eval(),
        "relaxed norms+biases": relaxed_nb.eval(),
    }


@pytest.mark.parametrize("kind", ["dense", "relaxed recursive", "relaxed norms+biases"])
def test_static_decode_step_equals_the_general_path(kind):
    model = _models()[kind]
    # logits step by step, on ragged rows, from identical prefilled caches
    caches = []
    for _ in range(2):
        c = KVCache.for_model(model, len(PROMPTS), 40)
        s = FullDepth()
        padded = torch.zeros(len(PROMPTS), max(map(len, PROMPTS)), dtype=torch.long)
        for b, p in enumerate(PROMPTS):
            padded[b, : len(p)] = torch.tensor(p)
        with torch.inference_mode():
            s.prefill(model, c, padded, np.array([len(p) for p in PROMPTS]))
        caches.append(c)
    general, static = FullDepth(), FullDepth(static=True)
    static.begin(model, caches[1], len(PROMPTS), 8)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for t in range(8):
            tok = torch.randint(0, 512, (len(PROMPTS),), generator=g)
            n_new = None if t < 5 else np.array([1, 0, 1, 1])  # row 1 finished
            a = general.decode(model, caches[0], tok, n_new).logits
            b = static.decode(model, caches[1], tok, n_new).logits
            live = [0, 2, 3] if n_new is not None else [0, 1, 2, 3]
            torch.testing.assert_close(b[live], a[live], atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(caches[1].lengths, caches[0].lengths)
    # and whole generations are token for token the same
    ref = generate(model, PROMPTS, GREEDY, strategy=FullDepth())
    out = generate(model, PROMPTS, GREEDY, strategy=FullDepth(static=True))
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


def test_static_step_refuses_what_it_cannot_run_and_full_depth_falls_back():
    mor = make_model(
        n_layers=4, sharing={"scheme": "middle_cycle", "loops": 2}, router={"kind": "token"}
    )
    assert "routers" in static_unsupported(mor)
    with pytest.raises(ValueError, match="routers"):
        StaticDecodeStep(mor, KVCache.for_model(mor, 1, 8))
    dense = make_model(n_layers=2)
    assert static_unsupported(dense) is None


def test_bf16_generation_agrees_with_fp32_within_tolerance():
    """Stated tolerance (teacher-forced, so one flipped near-tie cannot cascade): bf16 logits
    within 2% of the fp32 logit range, and at least 95% of next-token argmaxes identical
    (measured: 0.4% and 98.8% on this model). Generation in bf16 runs end to end."""
    model = make_model(n_layers=4)
    ids = torch.randint(0, 512, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = model(ids).float()
        half = make_model(n_layers=4).to(torch.bfloat16)
        b = half(ids).float()
    assert (a - b).abs().max() <= 0.02 * (a.max() - a.min())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    out = generate(half, PROMPTS, GREEDY)
    assert [len(r.token_ids) for r in out] == [12] * len(PROMPTS)
    assert all(0 <= t < 512 for r in out for t in r.token_ids)


def test_float16_training_and_missing_cuda_are_one_line_errors(capsys, tmp_path):
    from earlyexit.cli import main

    # the flag refuses what TrainConfig.validate refuses, with its message: a usage error
    with pytest.raises(SystemExit) as e:
        main(["train", "--dtype", "float16", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "float16 training is not supported" in err[0]
    with pytest.raises(ConfigError, match="float16 training is not supported"):
        TrainConfig(precision="float16").validate()
    if not torch.cuda.is_available():
        for argv in (
            ["bench", "decode", "--device", "cuda"],
            ["demo", "--quick", "--device", "cuda"],
        ):
            rc = main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 1 and len(err) == 1 and "CUDA was requested" in err[0], argv


@pytest.mark.slow
def test_compiled_static_step_on_cpu_equals_eager():
    model = make_model(n_layers=2)
    ref = generate(model, PROMPTS, GREEDY, strategy=FullDepth())
    out = generate(model, PROMPTS, GREEDY, strategy=FullDepth(compile=True))
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


# ---------------------------------------------------------------------- CUDA (pytest -m gpu)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["dense", "relaxed recursive"])
def test_cuda_generation_equals_cpu(kind):
    model = _models()[kind]
    ref = [r.token_ids for r in generate(model, PROMPTS, GREEDY)]
    gpu = model.to("cuda")
    assert [r.token_ids for r in generate(gpu, PROMPTS, GREEDY)] == ref
    out = generate(gpu, PROMPTS, GREEDY, strategy=FullDepth(compile=True))  # CUDA graphs
    assert [r.token_ids for r in out] == ref


@pytest.mark.gpu
@cuda
def test_cuda_engine_and_exits_equal_cpu():
    from earlyexit.engine import ExitMode, LLMEngine

    model = make_model(n_layers=4, exits={"steps": [2], "trained": True}, init_std=0.3)

    def serve(m):
        e = LLMEngine(m, policy="depthwise", max_batch=4, max_len=64)
        return [r.output_ids for r in e.generate(PROMPTS, GREEDY, ExitMode(2, 0.1))]

    assert serve(model.to("cuda")) == serve(model.cpu())


@pytest.mark.gpu
@cuda
def test_cuda_bf16_training_step(tmp_path):
    from earlyexit.training.corpus import prepare
    from earlyexit.training.loop import TrainConfig, train

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    (src / "b.py").write_text("class A:\n    pass\n" * 400)
    prepare([str(src)], tmp_path / "data", vocab_size=300, log=lambda *a: None)
    cfg = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "r"),
        model="tiny",
        steps=4,
        seq_len=32,
        batch_size=4,
        precision="bfloat16",
        device="cuda",
        eval_every=0,
    )
    s = train(cfg, progress=False, log=lambda *a, **k: None)
    assert s["finished"]


# ---------------------------------------------------------------------- training precision
def _cpu_flags() -> set[str]:
    from pathlib import Path

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


@pytest.mark.skipif(not _cpu_flags(), reason="needs /proc/cpuinfo")
def test_native_bf16_on_cpu_follows_the_cpu_flags(monkeypatch):
    """The independent reference is what the kernel reports: bf16 matmuls are native only
    with the AVX512-BF16 or AMX instructions (oneDNN emulates them otherwise)."""
    from earlyexit.device import native_bf16, resolve_precision

    monkeypatch.delenv("EARLYEXIT_NATIVE_BF16", raising=False)

    flags = _cpu_flags()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert native_bf16(torch.device("cpu")) == native
    assert resolve_precision("auto", torch.device("cpu"))[0] == (
        "bfloat16" if native else "float32"
    )


def test_the_environment_forces_either_precision_path_on_a_cpu(monkeypatch):
    from earlyexit.device import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    for forced, want in (("1", "bfloat16"), ("0", "float32")):
        monkeypatch.setenv("EARLYEXIT_NATIVE_BF16", forced)
        assert native_bf16(cpu) == (forced == "1")
        assert resolve_precision("auto", cpu)[0] == want


def test_auto_precision_picks_bf16_only_where_it_is_native(monkeypatch):
    from earlyexit import device
    from earlyexit.errors import DeviceError

    cpu = torch.device("cpu")
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(device, "native_bf16", lambda d, n=native: n)
        got, why = device.resolve_precision("auto", cpu)
        assert got == want and why.startswith("auto")
    # an explicit choice is kept, with a warning where bf16 would be emulated
    assert device.resolve_precision("float32", cpu) == ("float32", "as asked")
    got, why = device.resolve_precision("bfloat16", cpu)
    assert got == "bfloat16" and "emulated" in why
    with pytest.raises(DeviceError, match="precision must be one of"):
        device.resolve_precision("fp8", cpu)


def test_mfu_is_never_reported_above_one():
    from earlyexit.training.loop import model_flops_utilization

    assert model_flops_utilization(100.0, 1e6, 1e9) == pytest.approx(0.1)
    assert model_flops_utilization(100.0, 1e6, 0.0) is None
    # the probe measured a slower moment than training: an impossible ratio is not reported
    assert model_flops_utilization(3000.0, 1e6, 1e9) is None


def test_auto_dtype_is_bf16_only_where_native_and_the_cli_defaults_to_it(monkeypatch, tiny_lm_dir):
    """``--dtype auto`` (the CLI's default for inference): bf16 weights where the CPU runs
    bf16 natively, float32 elsewhere; the library's ``load`` keeps the stored dtype unless
    asked. Both paths are forced here, whatever this machine's CPU."""
    import earlyexit
    from earlyexit.device import resolve_dtype
    from earlyexit.errors import DeviceError

    cpu = torch.device("cpu")
    for forced, want in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("EARLYEXIT_NATIVE_BF16", forced)
        assert resolve_dtype("auto", cpu) == want
        lm = earlyexit.load(tiny_lm_dir, device="cpu", dtype="auto", draft=None)
        assert {p.dtype for p in lm.model.parameters()} == {want}
        assert {p.dtype for p in earlyexit.load(tiny_lm_dir, draft=None).model.parameters()} == {
            torch.float32
        }  # as stored
    with pytest.raises(DeviceError, match="use auto, float32"):
        resolve_dtype("fp8", cpu)


def test_nothing_compiles_unless_asked(monkeypatch):
    """Decoding (generate, the static step uncompiled, the engine) never calls
    ``torch.compile``: compilation is paid only where a caller asks for it (``--compile``)."""
    from earlyexit.engine.engine import LLMEngine

    def refuse(*a, **k):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", refuse)
    model = make_model(n_layers=2)
    generate(model, PROMPTS, GREEDY)
    generate(model, PROMPTS, GREEDY, strategy=FullDepth(static=True))
    engine = LLMEngine(model, max_batch=2, max_len=64)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=str(i))
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(AssertionError, match=r"torch\.compile called"):
        generate(model, PROMPTS, GREEDY, strategy=FullDepth(compile=True))
