"""``earlyexit eval perplexity``: token NLL and perplexity of a model on a prepared split.

Windows of ``seq_len`` tokens tile the split without overlap (each token is scored once,
with the context of its window); the tokenizer the data was prepared with must be the
model's, which is checked by hash when the model ships a ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch

from earlyexit.errors import InputError
from earlyexit.training.data import Windows, load_manifest, token_file, val_batches
from earlyexit.training.losses import evaluate_nll


def perplexity(
    model_dir: str | Path,
    data: str | Path,
    split: str = "val",
    seq_len: int = 256,
    batch_size: int = 8,
    max_batches: int = -1,
    device: str = "auto",
    dtype: str | None = None,
    routing: str = "causal",
) -> dict:
    """NLL (with its standard error across batches, ``nll_se``), perplexity and throughput of
    the model in ``model_dir`` on ``data``'s ``split``.

    ``routing`` (Mixture-of-Recursions models only): ``causal`` (the default: each token's
    depth from its own router scores, as in generation) or ``topk`` (the training rule,
    which looks at the whole window: not causal, reported for comparison only)."""
    if routing not in ("causal", "topk"):
        raise InputError(f"routing must be causal or topk, got {routing!r}")
    import earlyexit

    if seq_len < 1 or batch_size < 1:
        raise InputError("--seq-len and --batch-size must be >= 1")
    from earlyexit.registry import resolve_model

    model_dir = resolve_model(model_dir)
    lm = earlyexit.load(model_dir, device=device, dtype=dtype, draft=None)
    manifest = load_manifest(data)
    tok_file = Path(model_dir) / "tokenizer.json"
    if tok_file.is_file():
        h = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        if h != manifest["tokenizer"]["sha256"]:
            raise InputError(
                f"{data} was tokenized with a different tokenizer than {model_dir}'s; re-run `earlyexit prepare --tokenizer {tok_file}`"
            )
    if manifest["tokenizer"]["vocab_size"] > lm.config.vocab_size:
        raise InputError(
            f"{data}: its vocabulary ({manifest['tokenizer']['vocab_size']}) exceeds the model's ({lm.config.vocab_size})"
        )
    if seq_len > lm.config.max_context:
        raise InputError(
            f"--seq-len {seq_len} exceeds the model's context ({lm.config.max_context})"
        )
    windows = Windows(token_file(data, split), seq_len)
    n_batches = max_batches if max_batches > 0 else math.ceil(windows.n / batch_size)
    t = time.perf_counter()
    model = lm.model
    if routing == "topk":
        if model.routers is None:
            raise InputError("--routing topk applies to Mixture-of-Recursions models only")

        def model(x, _m=lm.model):
            return _m(x, routing="train")

    # one NLL per batch: the spread across batches gives the standard error of the mean
    # (tokens inside a window are correlated; batches of windows far apart much less so)
    per_batch = []
    with torch.inference_mode():
        for batch in val_batches(windows, batch_size, n_batches):
            per_batch.append(
                evaluate_nll(model, [batch], device=lm.model.tok_embeddings.weight.device)
            )
    tokens = sum(n for _, n in per_batch)
    nll = sum(v * n for v, n in per_batch) / max(tokens, 1)
    k = len(per_batch)
    se = math.sqrt(sum((v - nll) ** 2 for v, _ in per_batch) / (k - 1) / k) if k > 1 else None
    dt = time.perf_counter() - t
    return {
        "model": str(model_dir),
        "data": str(data),
        "split": split,
        "routing": routing if lm.model.routers is not None else None,
        "nll": nll,
        "nll_se": se,
        "perplexity": math.exp(min(nll, 50.0)),
        "tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
    }
