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

import numpy as np
import torch
import torch.nn.functional as F

from earlyexit.errors import InputError
from earlyexit.training.data import Windows, load_manifest, token_file, val_batches

# MoR models: each token's depth from its own router scores, or the training top-k rule
ROUTINGS = ("causal", "topk")


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
    token_nll: bool = False,
) -> dict:
    """NLL (with its standard error across batches, ``nll_se``), perplexity and throughput of
    the model in ``model_dir`` on ``data``'s ``split``.

    The tokens scored are the first ``max_batches`` x ``batch_size`` windows of ``seq_len``
    tokens of the split (all of it with ``max_batches`` -1); the result says how many
    (``tokens``, ``windows``, ``seq_len``). ``token_nll``: also return each scored token's NLL
    (``token_nll``, a float64 array in window order), for paired comparisons of two models
    on the same tokens (:func:`earlyexit.demo.stats.paired_se`).

    ``routing`` (Mixture-of-Recursions models only): ``causal`` (the default: each token's
    depth from its own router scores, as in generation) or ``topk`` (the training rule,
    which looks at the whole window: not causal, reported for comparison only)."""
    if routing not in ROUTINGS:
        raise InputError(f"routing must be causal or topk, got {routing!r}")
    import earlyexit

    if seq_len < 1 or batch_size < 1:
        raise InputError("--seq-len and --batch-size must be >= 1")
    from earlyexit.io.registry import resolve_model

    model_arg = str(model_dir)
    model_dir = resolve_model(model_dir)
    manifest = load_manifest(data)
    tok_file = Path(model_dir) / "tokenizer.json"
    if tok_file.is_file():
        h = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        if h != manifest["tokenizer"]["sha256"]:
            raise InputError(_retokenize_hint(model_arg, tok_file, data, manifest))
    lm = earlyexit.load(model_dir, device=device, dtype=dtype, draft=None)
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
    per_batch, kept = [], []
    dev = lm.model.tok_embeddings.weight.device
    with torch.inference_mode():
        for x, y in val_batches(windows, batch_size, n_batches):
            nll_t = F.cross_entropy(
                model(x.to(dev)).float().flatten(0, 1), y.to(dev).flatten(), reduction="none"
            ).double()
            per_batch.append((nll_t.sum().item() / nll_t.numel(), nll_t.numel()))
            if token_nll:
                kept.append(nll_t.cpu().numpy())
    tokens = sum(n for _, n in per_batch)
    nll = sum(v * n for v, n in per_batch) / max(tokens, 1)
    k = len(per_batch)
    se = math.sqrt(sum((v - nll) ** 2 for v, _ in per_batch) / (k - 1) / k) if k > 1 else None
    dt = time.perf_counter() - t
    out = {
        "model": str(model_dir),
        "data": str(data),
        "split": split,
        "routing": routing if lm.model.routers is not None else None,
        "nll": nll,
        "nll_se": se,
        "perplexity": math.exp(min(nll, 50.0)),
        "tokens": tokens,
        "windows": tokens // seq_len,
        "seq_len": seq_len,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
    }
    if token_nll:
        out["token_nll"] = np.concatenate(kept) if kept else np.zeros(0)
    return out


def _retokenize_hint(model: str, tok_file: Path, data, manifest: dict) -> str:
    """The error for data tokenized with another tokenizer: the `prepare` command that
    tokenizes the same corpus with the model's own (into a new folder: the old one is kept)."""
    import shlex

    from earlyexit.io.registry import NAMED

    named = model in NAMED and not Path(model).exists()
    tokenizer = model if named else str(tok_file)
    name = model if named else Path(model).name or "model"
    out = f"{str(data).rstrip('/')}-{name}"
    corpus = shlex.join(manifest.get("corpus") or ["stdlib"])
    return (
        f"{data} was tokenized with a different tokenizer than {model}'s "
        f"({manifest['tokenizer']['vocab_size']:,}-token vocabulary); tokenize the corpus "
        f"with the model's own: `earlyexit prepare --corpus {corpus} --tokenizer "
        f"{shlex.quote(tokenizer)} --out {shlex.quote(out)}`, then pass --data {shlex.quote(out)}"
    )
