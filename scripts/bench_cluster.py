"""Engine replicas on Ray Serve (``earlyexit serve --replicas``): what they buy on this machine.

    python scripts/bench_cluster.py [--clients 64] [--requests 256] [--tokens 64] [--out results/cluster.json]

A random-weight model of the demo's dense shape (``stdlib-small``: 8 layers, d 256, with the
byte-level tokenizer's vocabulary and an untrained exit after layer 2) is saved to a
temporary directory and served four ways, each under the same load: ``clients`` concurrent
streaming clients (threads in a separate process) sending ``requests`` completions of
``tokens`` tokens each (``ignore_eos``), half ``full`` and half ``free`` (threshold -1 with
``deep_kv: skip``: every token exits after 2 of 8 layers, so a free request costs a quarter
of a full one; a systems measurement, not a quality one):

1. ``earlyexit serve`` in one process, 2 threads (the baseline the cluster must beat);
2. one replica with 2 threads, Ray Serve's default router;
3. two replicas with 1 thread each, Ray Serve's default router (the shorter queue of two);
4. two replicas with 1 thread each, the work-aware router (fewest layer steps owed).

Then, on configuration 4 under a lighter load, one replica's process is killed: the time
until ``/health`` is ``ok`` again (both replicas running) and until a request is answered
by the restarted replica.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROMPTS = ["def main(", "import os", "class A:", "x = 1", "for i in", "# note", "print(", "if x:"]


def _client(url: str, bodies: list, out: dict, lock: threading.Lock) -> None:
    import httpx

    with httpx.Client(timeout=600) as c:
        for body in bodies:
            t0 = time.perf_counter()
            n = 0
            try:
                with c.stream("POST", url, json={**body, "stream": True}) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"]["message"])
                        n += len(event.get("depths", []))
                if n != body["max_tokens"]:
                    raise RuntimeError(f"got {n} of {body['max_tokens']} tokens")
                with lock:
                    out["latencies"].append(time.perf_counter() - t0)
                    out["got"] += n
            except Exception as e:
                with lock:
                    out["failures"].append(repr(e))


def drive(url: str, shares: list) -> dict:
    """Every client on a thread of its own (run in a separate process)."""
    out = {"latencies": [], "failures": [], "got": 0}
    lock = threading.Lock()
    t = time.perf_counter()
    with ThreadPoolExecutor(len(shares)) as ex:
        list(ex.map(lambda sh: _client(url, sh, out, lock), shares))
    out["seconds"] = time.perf_counter() - t
    return out


def workload(n_requests: int, tokens: int, clients: int) -> list[list[dict]]:
    bodies = []
    for i in range(n_requests):
        b = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}
        b["ignore_eos"] = True
        if i % 2:
            b.update(strategy="free", threshold=-1.0, deep_kv="skip")
        else:
            b["strategy"] = "full"
        bodies.append(b)
    return [bodies[i::clients] for i in range(clients)]


def save_model(root: Path) -> Path:
    from earlyexit.config import ModelConfig
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.models.decoder import Decoder
    from earlyexit.tokenizer import EOT, byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = ModelConfig.from_name(
        "stdlib-small",
        vocab_size=tok.vocab_size,
        eos_token_ids=[tok.token_to_id(EOT)],
        exits={"steps": [2]},
    )
    import torch

    model = Decoder(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return save_checkpoint(model.eval(), root / "stdlib-small-random", tokenizer=tok)


def measure(url: str, shares: list) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        out = pool.apply(drive, (url + "/v1/completions", shares))
    lat = out["latencies"]
    return {
        "tokens_per_s": out["got"] / out["seconds"],
        "seconds": out["seconds"],
        "tokens": out["got"],
        "failed": len(out["failures"]),
        "failures": out["failures"][:3],
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if lat else None,
    }


APP_KW = {"max_batch": 32, "max_len": 256, "max_queue": 1024, "allow_untrained_exits": True}


def single_process(ckpt: Path, shares: list) -> dict:
    import torch

    import earlyexit
    from earlyexit.serve.app import build_app
    from earlyexit.serve.server import bound_port, make_server

    torch.set_num_threads(2)
    app = build_app(earlyexit.load(str(ckpt), device="cpu"), "bench", **APP_KW)
    server = make_server(app, "127.0.0.1", 0, log_level="error")
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    assert server.ready.wait(120)
    try:
        return measure(f"http://127.0.0.1:{bound_port(server)}", shares)
    finally:
        server.should_exit = True
        th.join(timeout=60)
        app.state.worker.close()


def on_cluster(ckpt: Path, replicas: int, threads: int, router: str, shares, kill=False) -> dict:
    import httpx
    from ray import serve

    from earlyexit.serve import cluster as cl
    from earlyexit.serve.server import bound_port, make_server

    spec = cl.ReplicaSpec(str(ckpt), "bench", threads=threads, app_kw=APP_KW)
    spec.load_kw = {"device": "cpu"}
    t = time.perf_counter()
    handle = cl.start(spec, replicas, router=router)
    up = time.perf_counter() - t
    front = cl.Front(handle, replicas)
    server = make_server(front, "127.0.0.1", 0, log_level="error", limit_concurrency=4096)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    assert server.ready.wait(120)
    url = f"http://127.0.0.1:{bound_port(server)}"
    try:
        row = measure(url, shares) if shares else {}
        row["start_s"] = up
        if kill:
            row.update(recovery(url))
        return row
    finally:
        server.should_exit = True
        th.join(timeout=60)
        serve.delete(cl.APP)
        del httpx


def recovery(url: str) -> dict:
    """Kill one replica's process under a light load: seconds until /health is ok again
    and until the restarted replica answers a request."""
    import httpx

    body = {"prompt": "x = 1", "max_tokens": 8, "temperature": 0}
    with httpx.Client(timeout=60) as c:
        pids = set()
        while len(pids) < 2:  # learn both replicas' processes
            r = c.post(url + "/v1/completions", json=body)
            pids.add(int(r.headers["x-earlyexit-replica"]))
        victim = min(pids)
        stop = threading.Event()
        failed = []

        def load():  # a request in flight most of the time
            with httpx.Client(timeout=60) as lc:
                while not stop.is_set():
                    r = lc.post(url + "/v1/completions", json={**body, "max_tokens": 64})
                    if r.status_code != 200:
                        failed.append(r.status_code)

        th = [threading.Thread(target=load) for _ in range(4)]
        for x in th:
            x.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        degraded_s = health_s = answered_s = None
        while health_s is None or answered_s is None:
            if health_s is None:
                h = c.get(url + "/health")
                state = h.json().get("status") if h.status_code in (200, 503) else None
                if state != "ok" and degraded_s is None:
                    degraded_s = time.perf_counter() - t0  # the controller saw the death
                elif state == "ok" and degraded_s is not None:
                    health_s = time.perf_counter() - t0
            if answered_s is None:
                r = c.post(url + "/v1/completions", json=body)
                pid = int(r.headers.get("x-earlyexit-replica", 0) or 0)
                if r.status_code == 200 and pid not in pids:
                    answered_s = time.perf_counter() - t0
            if time.perf_counter() - t0 > 300:
                break
            time.sleep(0.05)
        stop.set()
        for x in th:
            x.join()
    return {
        "kill_to_health_degraded_s": degraded_s,
        "kill_to_health_ok_s": health_s,
        "kill_to_restarted_replica_answers_s": answered_s,
        "requests_failed_around_the_kill": len(failed),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--only", default="single,one,two-ray,two-work,kill")
    p.add_argument("--out", default="results/cluster.json")
    args = p.parse_args()
    import logging

    import ray

    from earlyexit.bench.common import environment

    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    only = args.only.split(",")
    shares = workload(args.requests, args.tokens, args.clients)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model(Path(tmp))
        base = {"clients": args.clients, "requests": args.requests, "max_tokens": args.tokens}
        if "single" in only:
            rows.append(
                {**base, "config": "one process, 2 threads", **single_process(ckpt, shares)}
            )
            print(rows[-1], flush=True)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
        try:
            for key, name, n, th, router in (
                ("one", "1 replica x 2 threads, router ray", 1, 2, "ray"),
                ("two-ray", "2 replicas x 1 thread, router ray", 2, 1, "ray"),
                ("two-work", "2 replicas x 1 thread, router work", 2, 1, "work"),
            ):
                if key in only:
                    rows.append({**base, "config": name, **on_cluster(ckpt, n, th, router, shares)})
                    print(rows[-1], flush=True)
            if "kill" in only:
                row = on_cluster(ckpt, 2, 1, "work", None, kill=True)
                rows.append({"config": "2 replicas x 1 thread: kill one", **row})
                print(rows[-1], flush=True)
        finally:
            ray.shutdown()
    env = environment(2)
    for r in rows:
        r["env"] = env
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
