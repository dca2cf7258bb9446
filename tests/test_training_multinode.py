"""Training across nodes: two ``torchrun`` launches (one process each, ``--nnodes 2``, c10d
rendezvous on 127.0.0.1) act as two machines on loopback. The run must equal one process
with the same global batch (fp32), write its checkpoints once, and resume exactly."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from earlyexit.io.checkpoint import load_checkpoint
from tests.test_training import _cli_train, cfg, losses_of, make_setup, run_quietly


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("multinode"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(setup, out, *extra) -> list[subprocess.CompletedProcess]:
    """One run on two "nodes": two torchrun agents that meet at a c10d rendezvous on
    127.0.0.1 (the README's command for real hosts, with loopback addresses)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            f"multinode-{port}",
            "--local-addr",
            "127.0.0.1",
            "-m",
            "earlyexit",
            "train",
            *_cli_train(setup, out, "--steps", "6", "--save-every", "3"),
            "--batch-size",
            "2",  # per process: the global batch is 2 nodes x 2 = 4
            "--precision",
            "float32",
            *extra,
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)  # a backstop against a hang only
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for node, p in enumerate(done):
        assert p.returncode == 0, f"node {node}:\n{p.stderr[-3000:]}"
    return done


def test_two_nodes_match_one_process_with_the_same_global_batch(setup, tmp_path):
    single = tmp_path / "single"
    run_quietly(cfg(setup, single, steps=6, save_every=3, batch_size=4, precision="float32"))
    # the two-node run is interrupted after step 3 and resumed: the same trajectory again
    multi = tmp_path / "multi"
    first = _two_nodes(setup, multi, "--stop-at-step", "3")
    second = _two_nodes(setup, multi, "--resume")

    # one rank talks and writes: one node's log has the run's banner, the other's none
    for launch in (first, second):
        assert sorted(p.stderr.count("training t:") for p in launch) == [0, 1]
    assert sum(p.stderr.count("resuming") for p in second) == 1
    assert json.loads((multi / "train_config.json").read_text())["world_size"] == 2

    # checkpoints written once: each step's metrics line once, each checkpoint once
    rows = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 7))
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000006",
    ]

    ref, got = losses_of(single), losses_of(multi)
    assert sorted(ref) == list(range(1, 7))
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])
    a, _ = load_checkpoint(single / "final")
    b, _ = load_checkpoint(multi / "final")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-4, rtol=0)
