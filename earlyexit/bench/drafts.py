"""Benchmark ``drafts``: lossless self-speculation from trained drafts against full depth.

    python scripts/bench_drafts.py --model smollm2 --draft runs/draft-smollm2/draft4 ...

Batch 1, greedy. Prompts: chat prompts about standard-library modules that no draft was
trained or evaluated on (under the model's chat template), and code windows from the
corpus's validation split. Each configuration (draft, ``k``, ``stop``) decodes every prompt
and so does full depth, interleaved pair by pair (``repeats`` pairs); the speedup is the
median of the per-pair ratios (spread: min-max), the outputs must be token-identical to full
depth, and acceptance, tokens per deep pass and the draft-length distribution come from the
strategy's own counters.
"""

from __future__ import annotations

import statistics
import warnings

from earlyexit.bench.common import environment, set_threads, write_rows
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.evaluation.metrics import timed_decode, validation_prompts


def eval_prompts(lm, data: str, n_chat: int, n_code: int, code_len: int = 64, skip_chat: int = 64):
    """{"chat": ids, "code": ids}: held-out chat prompts (after the ``skip_chat`` that draft
    training evaluated on) and code windows of the validation split."""
    from earlyexit.training.draft import chat_prompts

    _, held = chat_prompts()
    chat = [
        lm.encode_chat([{"role": "user", "content": p.text}])
        for p in held[skip_chat : skip_chat + n_chat]
    ]
    return {"chat": chat, "code": validation_prompts(data, n_code, code_len)}


def main_drafts(
    model: str,
    drafts: list[str],
    data: str,
    ks: tuple[int, ...] = (4,),
    stops: tuple[float, ...] = (0.0,),
    n_chat: int = 8,
    n_code: int = 8,
    new_tokens: int = 64,
    repeats: int = 2,
    threads: int | None = None,
    out: str | None = None,
) -> list[dict]:
    import earlyexit
    from earlyexit.drafts import attach

    warnings.simplefilter("ignore", ExitWarning)
    threads = set_threads(threads)
    env = environment(threads)
    base = earlyexit.load(model, draft=None)
    sets = eval_prompts(base, data, n_chat, n_code)
    prompts = [p for v in sets.values() for p in v]
    kinds = [k for k, v in sets.items() for _ in v]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows = []
    for d in drafts:
        m = attach(base.model, d)
        for k in ks:
            for stop in stops:
                ratios, tps_full, tps_spec, stats = [], [], [], None
                for _ in range(repeats):
                    t_full, res_full = timed_decode(
                        base.model, prompts, params, make_strategy(base.model, "full")
                    )
                    s = make_strategy(m, "speculative", draft_k=k, draft_stop=stop)
                    t_spec, res_spec = timed_decode(m, prompts, params, s)
                    full_ref = [r.token_ids for r in res_full]
                    if [r.token_ids for r in res_spec] != full_ref:
                        raise AssertionError(f"speculation from {d} changed the output")
                    n = sum(len(t) for t in full_ref)
                    ratios.append(t_full / t_spec)
                    tps_full.append(n / t_full)
                    tps_spec.append(n / t_spec)
                    stats = s.stats()
                row = {
                    "bench": "drafts",
                    "draft": d,
                    "exit_step": m.draft.exit_step,
                    "k": k,
                    "stop": stop,
                    "speedup": round(statistics.median(ratios), 3),
                    "speedup_min": round(min(ratios), 3),
                    "speedup_max": round(max(ratios), 3),
                    "full_tok_s": round(statistics.median(tps_full), 2),
                    "spec_tok_s": round(statistics.median(tps_spec), 2),
                    "identical": True,
                    "acceptance": round(stats["acceptance_rate"], 4),
                    "tokens_per_deep_pass": round(stats["tokens_per_deep_pass"], 3),
                    "draft_lengths": stats["draft_lengths"],
                    "prompts": {kind: kinds.count(kind) for kind in sets},
                    "new_tokens": new_tokens,
                    "repeats": repeats,
                    "held_out": m.draft.record.get("held_out", {}),
                    **env,
                }
                print(
                    f"{d} k={k} stop={stop}: {row['speedup']}x ({row['speedup_min']}-{row['speedup_max']}), "
                    f"{row['spec_tok_s']} vs {row['full_tok_s']} tok/s, acceptance {row['acceptance']:.0%}, "
                    f"{row['tokens_per_deep_pass']} tokens/deep pass, lengths {row['draft_lengths']}",
                    flush=True,
                )
                rows.append(row)
                write_rows(rows, out)
    return rows
