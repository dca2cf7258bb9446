"""Full-depth decode with the few-row linear kernel (``models/skinny.py``) on and off, in one
process, interleaved (BENCHMARKS.md, "drafts"): greedy tokens/s at batch 1 and 4 and a
verification-sized forward (1-5 new tokens at one row), for ``--model`` (default smollm2).

    python scripts/bench_skinny.py [--model smollm2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="results/skinny_decode.json")
    a = ap.parse_args()

    import torch

    import earlyexit
    from earlyexit.bench.common import environment, set_threads
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.models import skinny
    from earlyexit.models.kv_cache import KVCache

    env = environment(set_threads(None))
    lm = earlyexit.load(a.model, draft=None)
    m = lm.model
    chosen = skinny.chosen_rows()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, m.config.vocab_size, (32,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)

    def decode(batch: int) -> tuple[float, list]:
        t = time.perf_counter()
        out = []
        for i in range(0, len(prompts), batch):
            out += [r.token_ids for r in generate(m, prompts[i : i + batch], params)]
        return len(prompts) * a.new_tokens / (time.perf_counter() - t), out

    @torch.inference_mode()
    def forward_ms(T: int) -> float:
        cache = KVCache.for_model(m, 1, 256)
        x0 = torch.tensor([prompts[0]])
        m(x0, cache=cache)
        ts = []
        for _ in range(9):
            x = torch.randint(0, m.config.vocab_size, (1, T), generator=g)
            t = time.perf_counter()
            m(x, cache=cache)
            ts.append(time.perf_counter() - t)
            cache.lengths[:, 0] -= T
        return 1e3 * statistics.median(ts)

    rows = {"compiled": {}, "oneDNN": {}}
    outs = {}
    for _ in range(a.rounds):
        for name, rows_on in (("compiled", chosen), ("oneDNN", frozenset())):
            skinny._rows = rows_on
            for b in (1, 4):
                tps, out = decode(b)
                rows[name].setdefault(f"batch{b}_tok_s", []).append(tps)
                outs[(name, b)] = out
            for T in (1, 2, 3, 4, 5):
                rows[name].setdefault(f"forward{T}_ms", []).append(forward_ms(T))
    skinny._rows = chosen
    summary = {
        name: {k: round(statistics.median(v), 2) for k, v in r.items()} for name, r in rows.items()
    }
    res = {
        "bench": "skinny",
        "model": a.model,
        "chosen_rows": sorted(chosen),
        "rounds": a.rounds,
        "new_tokens": a.new_tokens,
        "same_tokens_batch1": outs[("compiled", 1)] == outs[("oneDNN", 1)],
        "same_tokens_batch4": outs[("compiled", 4)] == outs[("oneDNN", 4)],
        **summary,
        **env,
    }
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
