"""Benchmark: every strategy through the HTTP server, against full depth under the same
batching (issue 29).

    python scripts/bench_serve_strategies.py --model smollm2 --data data/smollm2-stdlib \\
        --max-batch 1 4 8 16

For each max batch, one server (the engine behind the OpenAI API, as ``earlyexit serve``)
serves the same requests (half held-out chat prompts, half code windows of the validation
split, as ``bench/drafts.py``) once per strategy, driven by ``2 x max batch``
streaming clients in a separate process (so the batch stays full). Generation lengths are
drawn per request from a seeded Normal(``gen_len``, ``length_sd``), clipped to
[``gen_len`` / 4, 2 ``gen_len``] (benchmarks.md's workload); ``length_sd=0`` gives every
request ``gen_len`` tokens, a workload that keeps full depth's rows in lockstep (they finish
together, so new prompts are prefilled together) where speculation's rows drift apart and
are prefilled one by one. Per strategy: tokens/s
and its ratio to ``full`` in the same server, drafts and acceptances (from ``usage``),
exits, and quality against the full-depth answers: exact-match rate of the texts and the
mean ROUGE-L over characters' tokens (re-encoded). Rounds alternate the strategies in
ABBA order (round 2 runs them backwards) so a slow moment of the machine, or a drift, hits
them alike; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from earlyexit.bench.common import environment, set_threads, write_rows
from earlyexit.evaluation.metrics import rouge_l

STRATEGIES = {
    "full": {"strategy": "full", "temperature": 0},
    "speculative": {"strategy": "speculative"},
    "free-adaptive": {"strategy": "free", "threshold": "adaptive", "temperature": 0},
}


def generation_lengths(n: int, mean: int, sd: float | None = None, seed: int = 0) -> list[int]:
    """``n`` seeded generation lengths ~ Normal(``mean``, ``sd``) (default ``mean`` / 4),
    rounded and clipped to [``mean`` / 4, 2 ``mean``]; ``sd=0``: all ``mean``."""
    sd = mean / 4 if sd is None else float(sd)
    if sd < 0 or mean < 1:
        raise ValueError(f"generation lengths need mean >= 1 and sd >= 0, got {mean}, {sd}")
    x = np.random.default_rng(seed).normal(mean, sd, n) if sd else np.full(n, float(mean))
    return [int(v) for v in np.clip(np.round(x), max(1, mean // 4), 2 * mean)]


def _one(url: str, prompt: list[int], g: int, fields: dict) -> dict:
    import httpx

    body = {"prompt": prompt, "max_tokens": g, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    body.update(fields)
    text, usage = [], None
    with httpx.Client(timeout=1200) as c, c.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                text.append(ch.get("text") or "")
    return {"text": "".join(text), "usage": usage}


def _drive(url: str, stream: list, fields: dict, clients: int) -> tuple[list[dict], float]:
    """All requests of ``stream`` through ``clients`` threads (in the client process)."""
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        out = list(ex.map(lambda pg: _one(url, pg[0], pg[1], fields), stream))
    return out, time.perf_counter() - t


def run(
    model: str = "smollm2",
    data: str = "data/smollm2-stdlib",
    max_batches: tuple[int, ...] = (1, 4, 8, 16),
    strategies: tuple[str, ...] = ("full", "speculative", "free-adaptive"),
    n_requests: int = 16,
    gen_len: int = 64,
    prompt_len: int = 48,
    rounds: int = 2,
    policy: str = "depthwise",
    exit_step: int | None = None,
    threads: int | None = None,
    out: str | None = "results/serve_strategies.json",
    draft_gate: str = "measured",
    length_sd: float | None = None,
    seed: int = 0,
) -> list[dict]:
    import earlyexit
    from earlyexit.bench.drafts import eval_prompts
    from earlyexit.serve.app import build_app
    from earlyexit.serve.protocol import Defaults
    from earlyexit.serve.server import bound_port, make_server

    threads = set_threads(threads)
    env = environment(threads)
    lm = earlyexit.load(model)
    # half held-out chat prompts (no draft saw them), half code from the validation split
    sets = eval_prompts(lm, data, n_requests - n_requests // 2, n_requests // 2, prompt_len)
    prompts = [p for v in sets.values() for p in v]
    lens = generation_lengths(len(prompts), gen_len, length_sd, seed)
    stream = list(zip(prompts, lens, strict=True))
    max_len = max(len(p) for p in prompts) + max(lens) + 8
    fields = {k: dict(STRATEGIES[k]) for k in strategies}
    if exit_step is not None:
        for k, f in fields.items():
            if k != "full":
                f["exit_step"] = exit_step
    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        for mb in max_batches:
            app = build_app(
                lm,
                "bench",
                policy,
                mb,
                max_len,
                max_queue=4 * n_requests,
                defaults=Defaults(),
                draft_gate=draft_gate,
            )
            server = make_server(app, "127.0.0.1", 0, log_level="error")
            th = threading.Thread(target=server.run, daemon=True)
            th.start()
            if not server.ready.wait(120):
                raise RuntimeError("the server did not start")
            url = f"http://127.0.0.1:{bound_port(server)}/v1/completions"
            clients = min(len(stream), 2 * mb)
            for k in strategies:  # a first request of each strategy is not timed
                pool.apply(_drive, (url, stream[: min(2, len(stream))], fields[k], 2))
            per = {k: [] for k in strategies}  # (seconds, results) per round
            for i in range(rounds):
                for k in strategies if i % 2 == 0 else strategies[::-1]:  # ABBA
                    res, dt = pool.apply(_drive, (url, stream, fields[k], clients))
                    per[k].append((dt, res))
            server.should_exit = True
            th.join(timeout=30)
            engine = app.state.worker.engine
            gate = {
                "name": draft_gate,
                "plain_rounds": int(engine.stats["plain_rounds"]),
                "seconds_per_token": engine.draft_gate.state(),
            }
            full_texts = [r["text"] for r in per["full"][-1][1]] if "full" in per else None
            tok = lm.tokenizer
            for k in strategies:
                secs = [dt for dt, _ in per[k]]
                res = per[k][-1][1]
                usage = [r["usage"] or {} for r in res]
                n_tok = sum(u.get("completion_tokens", 0) for u in usage)
                row = {
                    "bench": "serve-strategies",
                    "model": model,
                    "policy": policy,
                    "max_batch": mb,
                    "clients": clients,
                    "strategy": k,
                    "fields": fields[k],
                    "requests": len(stream),
                    "gen_len": gen_len,
                    "gen_lens": {"mean": float(np.mean(lens)), "min": min(lens), "max": max(lens)},
                    "length_sd": gen_len / 4 if length_sd is None else length_sd,
                    "tokens": n_tok,
                    "seconds": secs,
                    "tokens_per_s": n_tok / float(np.median(secs)),
                    "drafted": sum(u.get("drafted_tokens", 0) for u in usage),
                    "accepted": sum(u.get("accepted_tokens", 0) for u in usage),
                    "exited": sum(u.get("exited_tokens", 0) for u in usage),
                    "full_depth_fraction": float(
                        np.mean([u.get("full_depth_fraction", 1.0) for u in usage])
                    ),
                    "env": env,
                }
                if k == "speculative":  # what the draft gate learned (the server's whole run)
                    row["draft_gate"] = gate
                if row["drafted"]:
                    row["acceptance"] = row["accepted"] / row["drafted"]
                if "full" in per:
                    ratios = [
                        f_dt / dt for (dt, _), (f_dt, _) in zip(per[k], per["full"], strict=True)
                    ]
                    row["ratios"] = ratios
                    row["ratio_to_full"] = float(np.median(ratios))
                    row["ratio_range"] = [float(min(ratios)), float(max(ratios))]
                    texts = [r["text"] for r in res]
                    row["exact_match"] = float(np.mean([a == b for a, b in zip(texts, full_texts)]))
                    row["rouge_l"] = float(
                        np.mean(
                            [
                                rouge_l(
                                    tok.encode(a, add_special_tokens=False),
                                    tok.encode(b, add_special_tokens=False),
                                )
                                for a, b in zip(texts, full_texts)
                            ]
                        )
                    )
                rows.append(row)
                print(
                    f"  max batch {mb:>2} {k:<14} {row['tokens_per_s']:6.1f} tok/s"
                    + (
                        f"  {row['ratio_to_full']:.2f}x ({row['ratio_range'][0]:.2f}-"
                        f"{row['ratio_range'][1]:.2f})  exact {row['exact_match']:.2f}"
                        f"  ROUGE-L {row['rouge_l']:.3f}"
                        if "ratio_to_full" in row
                        else ""
                    )
                    + (f"  acceptance {row['acceptance']:.2f}" if "acceptance" in row else "")
                    + (f"  exited {row['exited']}" if row["exited"] else ""),
                    flush=True,
                )
            write_rows(rows, out)
    return rows
