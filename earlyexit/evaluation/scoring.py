"""Log-likelihood of a continuation under a decoding strategy (lm-eval's ``loglikelihood``).

A strategy decides each token's depth while generating; scoring under it means the logits
for continuation token i are the ones the strategy would produce at that position, i.e.
teacher-forced decoding with the strategy (prefill the context, then feed the continuation
one token at a time). Full depth (and a MoR model's router depth, whose causal routing is
the same in one forward) scores in one forward pass instead: identical logits, faster.
Self-speculation is lossless against full depth, so it scores as full depth too.
"""

from __future__ import annotations

import numpy as np
import torch

from earlyexit.decoding.base import Strategy
from earlyexit.errors import InputError
from earlyexit.models.kv_cache import KVCache


def _full_depth(strategy: Strategy) -> bool:
    return strategy.name in ("full", "mor", "speculative")


@torch.inference_mode()
def score(
    model, strategy: Strategy, context: list[int], continuation: list[int]
) -> tuple[float, bool, list[int]]:
    """(sum of log p(continuation | context), whether every continuation token is the
    argmax, depth per continuation token) with ``strategy``'s logits."""
    if not context or not continuation:
        raise InputError("scoring needs a non-empty context and continuation")
    n = len(context) + len(continuation)
    if n > model.config.max_context:
        raise InputError(
            f"context + continuation ({n} tokens) exceed the model's context ({model.config.max_context})"
        )
    dev = model.tok_embeddings.weight.device
    cont = torch.tensor(continuation, device=dev)
    if _full_depth(strategy):
        ids = torch.tensor([context + continuation[:-1]], device=dev)  # (1, T)
        kw = {"routing": "causal"} if model.routers is not None else {}
        logits = model(ids, **kw)[0, len(context) - 1 :].float()  # (C, V)
        depths = [model.n_steps] * len(continuation)  # MoR: nominal depth
    else:
        cache = KVCache.for_model(model, 1, n + strategy.cache_slack + 1)
        strategy.begin(model, cache, 1, len(continuation))
        out = strategy.prefill(
            model, cache, torch.tensor([context], device=dev), np.array([len(context)])
        )
        rows, depths = [out.logits[0]], [out.depths[0]]
        for t in continuation[:-1]:
            out = strategy.decode(model, cache, torch.tensor([t], device=dev))
            rows.append(out.logits[0])
            depths.append(out.depths[0])
        logits = torch.stack(rows).float()  # (C, V)
    logp = logits.log_softmax(-1)
    total = float(logp.gather(1, cont[:, None]).sum())
    greedy = bool((logits.argmax(-1) == cont).all())
    return total, greedy, depths
