"""Where batched speculation's time goes in the engine, offline (no HTTP): full depth vs
speculative on SmolLM2 with its shipped draft, 8 requests x 64 tokens at one max batch;
tokens/s, engine iterations, block passes, drafts, and seconds in each runner call
(BENCHMARKS.md, "serve-strategies"). ``python scripts/profile_engine_speculation.py 4 [measured|always|never]``
"""

from __future__ import annotations

import collections
import sys
import time


def main() -> None:
    import numpy as np
    import torch

    import earlyexit
    from earlyexit.bench.drafts import eval_prompts
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.decoding.speculative import make_gate
    from earlyexit.engine import ExitMode, LLMEngine

    torch.set_num_threads(2)
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    gate = sys.argv[2] if len(sys.argv) > 2 else "measured"  # serve --draft-gate
    lm = earlyexit.load("smollm2")
    sets = eval_prompts(lm, "data/smollm2-stdlib", 4, 4, 48)
    prompts = [p for v in sets.values() for p in v]
    for name, mode in [("full", None), ("speculative", ExitMode(strategy="speculative"))]:
        eng = LLMEngine(
            lm.model,
            lm.tokenizer,
            policy="depthwise",
            max_batch=mb,
            max_len=200,
            draft_gate=make_gate(gate),
        )
        secs, calls = collections.Counter(), collections.Counter()
        for obj, meth in [
            (eng.runner, "run"),
            (eng.runner, "draft"),
            (eng.runner, "chunk_argmax"),
            (eng.runner, "logits"),
            (eng, "_decide"),
        ]:
            f = getattr(obj, meth)

            def timed(*a, f=f, m=meth, secs=secs, calls=calls, **k):
                t = time.perf_counter()
                r = f(*a, **k)
                secs[m] += time.perf_counter() - t
                calls[m] += 1
                return r

            setattr(obj, meth, timed)
        if mode is not None:  # the forward-time measurement, before the clock starts
            eng.scheduler.cursors = {f"r{i}": None for i in range(mb)}
            prices = eng._draft_prices(2, 3)
            eng.scheduler.cursors = {}
            times = {k: round(v * 1e3, 1) for k, v in eng._forward_times.items()}
            print("draft prices", np.round(prices, 3).tolist(), "forward ms by rows", times)
        p = SamplingParams(max_new_tokens=64, ignore_eos=True, temperature=0)
        t = time.perf_counter()
        reqs = [eng.requests[eng.add_request(x, p, mode)] for x in prompts]
        while eng.has_unfinished():
            eng.step()
        dt = time.perf_counter() - t
        n = sum(len(r.output_ids) for r in reqs)
        split = {k: f"{v:.2f}s/{calls[k]}" for k, v in secs.items()}
        print(
            f"{name} max batch {mb}: {n / dt:.1f} tok/s, iterations {eng.stats['iterations']}, "
            f"block passes {eng.runner.block_calls}, drafted {eng.stats['drafted']}, "
            f"accepted {eng.stats['accepted']}, plain rounds {eng.stats['plain_rounds']}, {split}",
            flush=True,
        )
        if mode is not None:
            print("draft gate", eng.draft_gate.state(), flush=True)


if __name__ == "__main__":
    main()
