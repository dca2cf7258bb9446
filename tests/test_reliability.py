"""Reliability promises (docs/reliability.md): no lost training work, no crash from a bad
request. Training faults reuse test_training's tiny setup; the server scenario is the
`scripts/bench_reliability.py` harness at a smaller size."""

import importlib.util
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from earlyexit.errors import CheckpointError
from earlyexit.io.checkpoint import load_checkpoint
from earlyexit.training.state import latest_checkpoint
from tests.test_training import _cli_train, cfg, make_setup, run_quietly, wait_for_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    """``scripts/NAME.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("reliability"))


def _train_cmd(setup, out, steps, *extra):
    args = _cli_train(setup, out, "--steps", str(steps), "--save-every", "1", "--keep-last", "2")
    return [sys.executable, "-m", "earlyexit", "train", *args, "--threads", "1", *extra]


def test_killed_repeatedly_then_resumed_ends_with_the_uninterrupted_weights(setup, tmp_path):
    """kill -9 at random moments (mid-step and mid-save: every step saves), resume each
    time; the run ends with exactly the weights of a run that was never interrupted."""
    steps = 400
    ref = subprocess.run(
        _train_cmd(setup, tmp_path / "ref", steps),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    # kill once the run has passed a random step in each quarter: every step saves, so the
    # kill lands inside the next step or inside its checkpoint write
    for lo in (10, 100, 200, 300):
        target = rng.randint(lo, lo + 80)
        resume = ["--resume"] if (out / "latest").exists() else []
        p = subprocess.Popen(
            _train_cmd(setup, out, steps, *resume),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_checkpoint(out, p, target)  # an observed event, not a clock
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        load_checkpoint(latest_checkpoint(out))  # whatever the moment of the kill
    assert kills == 4 and not (out / "final").exists()
    done = subprocess.run(
        _train_cmd(setup, out, steps, "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize(
    "errno, text",
    [(30, "Read-only file system"), (13, "Permission denied"), (28, "No space left on device")],
)
def test_unwritable_output_during_save_keeps_the_previous_checkpoint(
    setup, tmp_path, monkeypatch, errno, text
):
    import earlyexit.training.state as st

    real, calls = st.save_file, []

    def failing(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint's first file
            raise OSError(errno, text)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", failing)
    run = tmp_path / "r"
    with pytest.raises(
        CheckpointError, match=rf"{run}.*step-000008: could not write the checkpoint \({text}\)"
    ):
        run_quietly(cfg(setup, run))
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000004"
    load_checkpoint(ckpt)
    # and the run resumes from it once the disk is writable again
    monkeypatch.setattr(st, "save_file", real)
    s = run_quietly(cfg(setup, run), resume=True)
    assert s["finished"]


def test_server_under_load_and_abuse():
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    harness = _script("bench_reliability")
    ABUSE, run = harness.ABUSE, harness.run

    fig = run(
        n_requests=150,
        clients=12,
        disconnects=6,
        idle=4,
        max_batch=8,
        out=None,
        memory_requests=300,
        big_prompts=2,
        nonstream_disconnects=2,
        request_timeout=1.0,
        gap_tokens=60,
        gap_bar=10.0,  # a backstop: a loaded machine stalls streams too (the bench's bar: 0.5 s)
    )
    assert fig["failures"] == 0, fig["failure_details"]
    assert fig["answered"] == 150 and fig["duplicates"] == 0
    assert fig["abusive_refused_correctly"] == 2 * len(ABUSE)
    assert fig["slots_freed"] and fig["healthy_after"] and fig["disconnects"] == 6
    assert fig["unicode_prompts_served"] == 5
    assert fig["idle_closed_by_server"] == 4 and fig["big_prompts_refused"] == 2
    assert fig["fault_recovered"] and fig["health_during_fault"] == 503
    assert fig["nonstream_aborted_early"] == 2
    assert fig["engine_tables_after"] == {"requests": 0, "trackers": 0, "streams": 0}


def test_no_pickle_anywhere_in_the_package():
    """Weights and training state are read only through safetensors and JSON: no code path
    can unpickle a file (pickle executes code)."""
    from pathlib import Path

    import earlyexit

    root = Path(earlyexit.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        for needle in ("torch.load(", "pickle.load", "import pickle", "torch.jit.load", "np.load("):
            if needle in text:
                offenders.append(f"{f.relative_to(root)}: {needle}")
    assert offenders == []
