"""Where served speculation's time goes, offline, iteration by iteration (BENCHMARKS.md,
"serve-strategies", runs 8-9): the engine on SmolLM2 with its shipped draft, one engine per
gate (``full`` is full depth), all kept across rounds as a server keeps its gate, rounds in
ABBA order; per iteration: running / waiting requests, tokens emitted, seconds, drafted
tokens, plain rounds and the gate's current mode and bucket, written as JSON.

    python scripts/log_engine_gate.py --max-batch 8 --rounds 2 --gates full measured never
    python scripts/log_engine_gate.py --max-batch 8 --length-sd 0   # every request 64 tokens
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    import earlyexit
    from earlyexit.bench.drafts import eval_prompts
    from earlyexit.bench.serve_strategies import generation_lengths
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.decoding.speculative import GATES, make_gate
    from earlyexit.engine import ExitMode, LLMEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="data/smollm2-stdlib")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--length-sd", type=float, default=None)
    ap.add_argument("--gates", nargs="+", default=["full", "measured", "never"],
                    choices=["full", *GATES])  # fmt: skip
    ap.add_argument("--out", default="results/engine_gate_log.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    lm = earlyexit.load(a.model)
    sets = eval_prompts(lm, a.data, a.requests - a.requests // 2, a.requests // 2, 48)
    prompts = [p for v in sets.values() for p in v]
    lens = generation_lengths(len(prompts), a.new_tokens, a.length_sd)
    params = [SamplingParams(max_new_tokens=g, ignore_eos=True, temperature=0) for g in lens]
    engines = {}
    for g in a.gates:
        engines[g] = LLMEngine(lm.model, lm.tokenizer, policy="depthwise", max_batch=a.max_batch,
                               max_len=300, draft_gate=make_gate("never" if g == "full" else g))  # fmt: skip
        engines[g].prepare_speculation()  # as a server does at start
    logs = {g: [] for g in a.gates}
    rates = {g: [] for g in a.gates}
    for r in range(a.rounds):
        for g in a.gates if r % 2 == 0 else a.gates[::-1]:
            eng = engines[g]
            mode = None if g == "full" else ExitMode(strategy="speculative")
            t0 = time.perf_counter()
            reqs = [eng.requests[eng.add_request(x, q, mode)] for x, q in zip(prompts, params)]
            while eng.has_unfinished():
                d0, p0 = eng.stats["drafted"], eng.stats["plain_rounds"]
                n, w = eng.scheduler.num_running, eng.scheduler.num_waiting
                start = time.perf_counter()
                events = eng.step()
                gate = eng.draft_gate
                logs[g].append({
                    "round": r, "t": start - t0, "seconds": time.perf_counter() - start,
                    "running": n, "waiting": w,
                    "tokens": sum(len(e.new_token_ids) for e in events),
                    "drafted": eng.stats["drafted"] - d0, "plain": eng.stats["plain_rounds"] - p0,
                    "gate_mode": gate._mode, "gate_bucket": gate._bucket,
                })  # fmt: skip
            dt = time.perf_counter() - t0
            rates[g].append(sum(len(q.output_ids) for q in reqs) / dt)
            print(f"round {r} {g:<9} {rates[g][-1]:6.1f} tok/s  {dt:5.1f} s  drafted "
                  f"{eng.stats['drafted']}  plain rounds {eng.stats['plain_rounds']}", flush=True)  # fmt: skip
        if "measured" in engines:
            print("  gate", json.dumps(engines["measured"].draft_gate.state()), flush=True)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "tokens_per_s": rates, "iterations": logs}, f)


if __name__ == "__main__":
    main()
