"""The training loop: exact resume, kill -9 safety, NaN handling, full disk, DDP equivalence."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from earlyexit.errors import CheckpointError, InputError
from earlyexit.io.checkpoint import load_checkpoint
from earlyexit.training import losses
from earlyexit.training.corpus import prepare
from earlyexit.training.data import TrainBatches, Windows
from earlyexit.training.loop import TrainConfig, TrainingError, param_groups, train
from earlyexit.training.schedule import lr_at
from earlyexit.training.state import latest_checkpoint

TINY_MODEL = {
    "name": "t",
    "vocab_size": 300,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 64,
    "max_context": 64,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("train"))


def make_setup(root: Path) -> Path:
    """A tiny prepared corpus and model config under ``root`` (shared with test_reliability)."""
    src = root / "src"
    src.mkdir()
    for i in range(30):
        (src / f"m{i}.py").write_text(
            "".join(f"def fn_{i}_{j}(a, b):\n    return a * {j} - b\n" for j in range(30))
        )
    prepare([str(src)], root / "data", vocab_size=300, log=lambda *a: None)
    (root / "model.json").write_text(json.dumps(TINY_MODEL))
    return root


def cfg(setup, out, **kw) -> TrainConfig:
    base = dict(
        data=str(setup / "data"),
        out=str(out),
        model=str(setup / "model.json"),
        seq_len=16,
        batch_size=4,
        steps=8,
        lr=1e-2,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        log_every=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def losses_of(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_quietly(c, **kw):
    return train(c, progress=False, log=lambda *a, **k: None, **kw)


def test_schedules():
    assert lr_at(0, lr=1.0, steps=100, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, steps=100, warmup=10) == pytest.approx(1.0)
    assert lr_at(99, lr=1.0, steps=100, warmup=10, min_lr_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    wsd = [
        lr_at(s, lr=1.0, steps=100, warmup=5, schedule="wsd", decay_fraction=0.2)
        for s in range(100)
    ]
    assert (
        wsd[50] == 1.0
        and wsd[79] == 1.0
        and wsd[99] < 0.2
        and all(a >= b for a, b in itertools.pairwise(wsd[5:]))
    )


def test_weight_decay_only_on_matrices():
    from tests.conftest import make_model

    model = make_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith(
            ("wqkv.weight", "wo.weight", "w13.weight", "w2.weight", "head.weight")
        )
        for p in decay["params"]
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight"}


def test_ranks_read_the_rows_one_big_batch_reads(setup):
    from earlyexit.training.data import token_file

    w = Windows(token_file(setup / "data", "train"), 16)
    one = TrainBatches(w, 4, seed=3)
    two = [TrainBatches(w, 2, seed=3, rank=r, world=2) for r in range(2)]
    for i in range(w.n // 4 + 3):  # crosses an epoch boundary
        x1, _ = one.batch(i)
        x2 = torch.cat([t.batch(i)[0] for t in two])
        assert torch.equal(x1, x2)
    assert torch.equal(TrainBatches(w, 4, seed=3).batch(5)[0], one.batch(5)[0])


def test_training_reduces_loss_and_writes_a_usable_model(setup, tmp_path):
    s = run_quietly(cfg(setup, tmp_path / "r", steps=30, eval_every=10, save_every=10, keep_last=2))
    ls = losses_of(tmp_path / "r")
    assert s["finished"] and ls[30] < ls[1] - 1.0
    model, tok = load_checkpoint(s["final"])
    assert tok is not None and model.config.vocab_size == 300
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["step-000020", "step-000030"]
    assert (tmp_path / "r" / "latest").read_text().strip() == "step-000030"


def test_resume_retraces_the_uninterrupted_run_exactly(setup, tmp_path):
    straight = tmp_path / "straight"
    run_quietly(cfg(setup, straight))
    cut = tmp_path / "cut"
    first = run_quietly(cfg(setup, cut, stop_at_step=4))
    assert not first["finished"] and first["steps"] == 4
    assert not (cut / "final").exists()
    second = run_quietly(cfg(setup, cut), resume=True)
    assert second["finished"]
    a, b = losses_of(straight), losses_of(cut)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    ma, _ = load_checkpoint(straight / "final")
    mb, _ = load_checkpoint(cut / "final")
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, atol=1e-6, rtol=0)


def test_resume_refuses_a_changed_setup_and_fresh_runs_refuse_an_old_dir(setup, tmp_path):
    run_quietly(cfg(setup, tmp_path / "r", stop_at_step=4))
    with pytest.raises(TrainingError, match="seq_len differ"):
        run_quietly(cfg(setup, tmp_path / "r", seq_len=8), resume=True)
    with pytest.raises(InputError, match="already holds a run"):
        run_quietly(cfg(setup, tmp_path / "r"))
    with pytest.raises(InputError, match="exceeds the model's context"):
        run_quietly(cfg(setup, tmp_path / "r2", seq_len=128))


class _NaNAt(losses.LanguageModeling):
    """LM loss that turns NaN on the 3rd call (tests only)."""

    calls = 0

    def __call__(self, model, x, y):
        out = super().__call__(model, x, y)
        type(self).calls += 1
        if type(self).calls == 7:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_stops_with_the_step_or_skips(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.OBJECTIVES, "nan-test", _NaNAt)
    _NaNAt.calls = 0
    with pytest.raises(
        TrainingError, match=r"non-finite loss .* at step 7.*Last good checkpoint: .*step-000004"
    ):
        run_quietly(cfg(setup, tmp_path / "stop", objective="nan-test"))
    load_checkpoint(latest_checkpoint(tmp_path / "stop"))  # still loadable
    _NaNAt.calls = 0
    s = run_quietly(cfg(setup, tmp_path / "skip", objective="nan-test", nonfinite="skip"))
    assert s["finished"] and s["skipped_steps"] == 1


def test_full_disk_during_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    import earlyexit.training.state as st

    real, calls = st.save_file, []

    def flaky(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint's first file
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(
        CheckpointError,
        match=r"step-000008: could not write the checkpoint \(No space left on device\)",
    ):
        run_quietly(cfg(setup, tmp_path / "r"))
    ckpt = latest_checkpoint(tmp_path / "r")
    assert ckpt.name == "step-000004"
    load_checkpoint(ckpt)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000004"]


def _cli_train(setup, out, *extra, env=None):
    args = [
        "--data",
        str(setup / "data"),
        "--out",
        str(out),
        "--model",
        str(setup / "model.json"),
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]
    return args


def _step_of(ckpt) -> int:
    return -1 if ckpt is None else int(ckpt.name.split("-")[1])


def wait_for_checkpoint(out, p, step: int, backstop_s: float = 900.0) -> None:
    """Wait until the run in ``out`` has a checkpoint at ``step`` or later (or the process
    ended). Waits on the files the trainer writes, not on a clock: on a loaded machine the
    start-up alone (importing torch) can take many seconds. ``backstop_s`` only turns a hang
    into a failure."""
    deadline = time.monotonic() + backstop_s
    while p.poll() is None and _step_of(latest_checkpoint(out)) < step:
        assert time.monotonic() < deadline, f"no checkpoint at step {step} after {backstop_s}s"
        time.sleep(0.002)


def test_kill_9_never_leaves_an_unreadable_latest_checkpoint(setup, tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # far more steps than the test waits for, so every kill lands mid-run
    base = [
        sys.executable,
        "-m",
        "earlyexit",
        "train",
        *_cli_train(setup, out),
        "--steps",
        "100000",
    ]
    # checkpoint every step, so kills land inside saves as often as between them; each kill
    # comes once the run has passed a few more steps than the last one (an observed event)
    for more in (2, 5, 9):
        resume = ["--resume"] if (out / "latest").exists() else []
        p = subprocess.Popen(
            [*base, "--save-every", "1", "--keep-last", "2", *resume],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_checkpoint(out, p, _step_of(latest_checkpoint(out)) + more)
        assert p.poll() is None, "the run ended before it was killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
        model, _ = load_checkpoint(latest_checkpoint(out))  # whatever the moment of the kill
        assert model.config.vocab_size == 300
    last = latest_checkpoint(out)
    step = _step_of(last)
    # resuming goes on from the latest checkpoint
    done = subprocess.run(
        [*base, "--save-every", "1", "--resume", "--stop-at-step", str(step + 3)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert f"from {last.name}" in done.stderr
    assert latest_checkpoint(out).name == f"step-{step + 3:06d}"


def _torchrun(setup, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "earlyexit",
        "train",
        *_cli_train(setup, out, "--steps", "6", "--save-every", "3"),
        "--batch-size",
        "2",
        *extra,
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_two_ranks_match_one_rank_with_twice_the_batch(setup, tmp_path):
    # an exactness test: fp32 pinned (precision auto is bf16 on CPUs with AMX/AVX512-BF16,
    # where the 1e-4 tolerance below means nothing; bf16 has its own test)
    single = tmp_path / "single"
    run_quietly(cfg(setup, single, steps=6, save_every=3, batch_size=4, precision="float32"))
    ddp = tmp_path / "ddp"
    _torchrun(setup, ddp, "--precision", "float32")
    # FSDP2, interrupted after step 3 and resumed: the same trajectory again
    fsdp = tmp_path / "fsdp"
    _torchrun(setup, fsdp, "--fsdp", "--stop-at-step", "3", "--precision", "float32")
    p = _torchrun(setup, fsdp, "--fsdp", "--resume", "--precision", "float32")
    assert p.stderr.count("resuming") == 1  # only rank 0 talks
    ref = losses_of(single)
    for run in (ddp, fsdp):
        got = losses_of(run)
        assert sorted(got) == sorted(ref) == list(range(1, 7))
        for step in ref:
            assert abs(got[step] - ref[step]) < 1e-4, (run.name, step, got[step], ref[step])
    assert json.loads((ddp / "train_config.json").read_text())["world_size"] == 2
    a, _ = load_checkpoint(single / "final")
    b, _ = load_checkpoint(fsdp / "final")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-4, rtol=0)


def test_bf16_autocast_step_agrees_with_fp32(setup, tmp_path):
    a = run_quietly(cfg(setup, tmp_path / "a", steps=2, eval_every=2, save_every=0))
    b = run_quietly(
        cfg(setup, tmp_path / "b", steps=2, eval_every=2, save_every=0, precision="bfloat16")
    )
    la, lb = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    assert abs(la[1] - lb[1]) < 0.05 * la[1]  # stated tolerance: 5% of the loss
    assert abs(a["val_nll"] - b["val_nll"]) < 0.05 * a["val_nll"]


def test_eval_perplexity_matches_training_validation(setup, tmp_path, capsys):
    from earlyexit.cli import main

    s = run_quietly(cfg(setup, tmp_path / "r", steps=4, save_every=0))
    code = main(
        [
            "eval",
            "perplexity",
            "--model",
            s["final"],
            "--data",
            str(setup / "data"),
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--max-batches",
            "2",
            "--device",
            "cpu",
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and abs(res["nll"] - s["val_nll"]) < 1e-5 and res["tokens"] == 2 * 4 * 16
    code = main(
        [
            "eval",
            "perplexity",
            "--model",
            s["final"],
            "--data",
            str(tmp_path / "nope"),
            "--device",
            "cpu",
        ]
    )
    assert code == 1 and "not a prepared data directory" in capsys.readouterr().err


def test_train_cli_reports_bad_config(setup, tmp_path, capsys):
    from earlyexit.cli import main

    code = main(["train", *_cli_train(setup, tmp_path / "r", "--steps", "0")])
    assert code == 1 and "steps must be >= 1" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"stepz": 3}))
    code = main(["train", "--config", str(tmp_path / "c.json")])
    assert code == 1 and "unknown key(s) 'stepz'" in capsys.readouterr().err
    code = main(["train", "--preset", "nope"])
    assert code == 1 and "unknown training preset" in capsys.readouterr().err


def test_two_trainers_cannot_share_a_run_directory(setup, tmp_path):
    from earlyexit.training.state import lock_run

    held = lock_run(tmp_path / "r")
    try:
        with pytest.raises(CheckpointError, match="another training process"):
            run_quietly(cfg(setup, tmp_path / "r"))
    finally:
        held.close()
    assert run_quietly(cfg(setup, tmp_path / "r", steps=2))["finished"]


def test_fine_tune_from_a_checkpoint_and_resume_it(setup, tmp_path):
    base = run_quietly(cfg(setup, tmp_path / "base", steps=4, save_every=0))
    c = cfg(setup, tmp_path / "ft", model="does-not-matter", init_from=base["final"], lr=1e-3)
    run_quietly(TrainConfig(**{**c.__dict__, "stop_at_step": 4}))
    s = run_quietly(c, resume=True)
    assert s["finished"]
    first = losses_of(tmp_path / "ft")[1]
    assert first < losses_of(tmp_path / "base")[1]  # it started from the trained weights


def test_document_masked_training_uses_the_mask(setup, tmp_path, monkeypatch):
    """--doc-mask: every objective's forward runs inside model.documents(segments of x);
    the run trains, and its losses differ from the unmasked run's (windows cross documents)."""
    from earlyexit.models.decoder import Decoder

    src = tmp_path / "short"
    src.mkdir()
    for i in range(80):  # documents shorter than a window: every window crosses one
        (src / f"d{i}.py").write_text(f"x{i} = {i}\n")
    data = tmp_path / "data"
    tok = str(setup / "data" / "tokenizer.json")
    prepare([str(src)], data, tokenizer=tok, val_fraction=0.3, log=lambda *a: None)
    seen = []
    real = Decoder.documents

    def spy(self, segments):
        seen.append(segments)
        return real(self, segments)

    monkeypatch.setattr(Decoder, "documents", spy)
    kw = dict(steps=3, eval_every=0, data=str(data))
    masked = run_quietly(cfg(setup, tmp_path / "m", doc_mask=True, **kw))
    assert masked["finished"] and len(seen) == 3
    assert all(s.shape == (4, 16) and int(s.max()) >= 1 for s in seen)  # several documents
    run_quietly(cfg(setup, tmp_path / "p", **kw))
    assert len(seen) == 3  # the unmasked run never enters documents()
    assert losses_of(tmp_path / "m")[3] != losses_of(tmp_path / "p")[3]
