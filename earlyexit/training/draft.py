"""Training a draft exit from cached activations (Kangaroo, arXiv 2404.18911; issue 28).

A draft is an attention adapter (``ExitConfig.attention``) plus its own norm after an early
layer of a *frozen* model, read through the model's tied head pruned to its most frequent
tokens (FR-Spec). Because the body is frozen, its states at the exit and its final
distribution never change during training, so they are computed once and stored:

1. **Sequences** (:func:`chat_prompts`, :func:`self_distill`, :func:`stdlib_windows`): what the
   draft will see in service. SmolLM2 is a chat model, so most of it is the model's own greedy
   answers to chat prompts (self-distillation, as Medusa-2 and EAGLE do: the draft learns the
   distribution it will be verified against), plus windows of the standard-library corpus.
   Prompts are built from the standard library's documented functions and classes and split
   by module name, so held-out chat prompts and held-out code are separate evaluations.
2. **The activation cache** (:func:`cache_activations`): one uncached forward of the frozen
   model per window of ``seq_len`` tokens stores, memory-mapped on disk, the exit's input
   states (n, S, d) for each requested exit step and the final layer's top-``topk``
   probabilities and token ids (n, S, K). Written into a temporary directory and renamed.
3. **Training** (:func:`train_draft`): many epochs over the cache without running the body:
   soft-label distillation (cross-entropy of the draft's softmax over the pruned vocabulary
   against the final top-K probabilities), held-out top-1 agreement (the greedy acceptance
   rate) and sum-min(p, q) reported as it trains, resumable from atomic checkpoints.

Stored per token: fp32 states (exact: a test recomputes them), 2.3 kB per cached exit at
SmolLM2's width, and top-32 targets in fp16 with int32 ids, 192 bytes (SmolLM2, 4 exits,
156k tokens: 1.4 GB; BENCHMARKS.md, "drafts").
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from earlyexit.errors import InputError
from earlyexit.files import atomic_dir, atomic_file, atomic_write
from earlyexit.progress import progress
from earlyexit.training.schedule import lr_at

CACHE_FORMAT = 1

# What users ask a small chat model about code; filled with a documented stdlib name.
_TEMPLATES = (
    "Explain what the Python function `{qual}` from the `{mod}` module does.",
    "How do I use `{qual}` in Python? Give a short example.",
    "What does this docstring mean? {doc}",
    "Summarize in one sentence: {doc}",
    "Write a small Python program that uses `{mod}.{name}`.",
    "What is the `{mod}` module used for?",
    "When should I use `{qual}` instead of writing my own code?",
    "Explain this to a beginner: {doc}",
)


@dataclass(frozen=True)
class ChatPrompt:
    module: str  # stdlib module the prompt is about (the train/held-out split key)
    text: str


def chat_prompts(held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Chat prompts about the standard library's documented functions and classes, as
    (train, held_out) lists of :class:`ChatPrompt`, split by module so that no held-out
    prompt asks about a module the draft was trained on. Deterministic."""
    from earlyexit.training.corpus import is_validation, stdlib_files

    rng = random.Random(seed)
    train, held = [], []
    for name, path in stdlib_files():
        mod = name.removeprefix("stdlib/").removesuffix(".py").replace("/", ".")
        mod = mod.removesuffix(".__init__")
        if any(part.startswith("_") for part in mod.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 20:
                continue
            doc = " ".join(doc.split("\n\n")[0].split())[:300]
            text = rng.choice(_TEMPLATES).format(
                qual=f"{mod}.{node.name}", mod=mod, name=node.name, doc=doc
            )
            (held if is_validation(mod, held_out_fraction) else train).append(ChatPrompt(mod, text))
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def self_distill(
    lm, prompts: list[ChatPrompt], max_new_tokens: int, batch_size: int = 16, show: bool = True
) -> list[list[int]]:
    """Each prompt under the model's chat template followed by the model's own greedy answer,
    as token ids (prompt + answer + end token when it ended); prompts that leave no room for
    ``max_new_tokens`` in the model's context are skipped."""
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    out: list[list[int]] = []
    room = lm.config.max_context - max_new_tokens
    encoded = [lm.encode_chat([{"role": "user", "content": p.text}]) for p in prompts]
    fits = [ids for ids in encoded if len(ids) <= room]  # prompts too long for the context
    bar = progress(show, total=len(fits), desc="self-distillation", unit="prompt")
    for i in range(0, len(fits), batch_size):
        ids = fits[i : i + batch_size]
        with torch.inference_mode():
            res = generate(lm.model, ids, params, lm.tokenizer)
        for p, r in zip(ids, res):
            eos = [lm.config.eos_token_ids[0]] if r.finish_reason == "stop" else []
            out.append([*p, *r.token_ids, *eos])
        bar.update(len(ids))
    bar.close()
    return out


def pack(sequences: list[list[int]], seq_len: int) -> np.ndarray:
    """Sequences concatenated and cut into windows (n, seq_len) (the remainder dropped)."""
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def stdlib_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n`` windows (n, seq_len) at random offsets of a token stream (a prepared corpus)."""
    if len(tokens) < seq_len + 1:
        raise InputError(f"the corpus has {len(tokens)} tokens, fewer than one window")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=n)
    return np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])


def save_windows(path: str | Path, parts: dict[str, np.ndarray]) -> None:
    """Named token windows (n, S) as one raw int64 file beside ``path`` (JSON: names and
    shapes), written atomically. Read back with :func:`load_windows`."""
    path = Path(path)
    flat = np.concatenate([v.reshape(-1, v.shape[-1]) for v in parts.values()])
    with atomic_file(path.with_suffix(".i64")) as tmp:
        flat.astype(np.int64).tofile(tmp)
    atomic_write(path, json.dumps({k: list(v.shape) for k, v in parts.items()}) + "\n")


def load_windows(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    shapes = json.loads(path.read_text())
    flat = np.fromfile(path.with_suffix(".i64"), dtype=np.int64)
    out, at = {}, 0
    for k, (n, S) in shapes.items():
        out[k] = flat[at : at + n * S].reshape(n, S)
        at += n * S
    return out


# ---------------------------------------------------------------------- activation cache
def model_fingerprint(model) -> dict:
    """What a draft (and a cache) must match: the model's shape and a hash of a sample of
    its weights (the embedding/head rows a draft reads and the body's first block)."""
    cfg = model.config
    h = hashlib.sha256()
    w = model.head_weight().detach()
    h.update(w[:: max(1, w.shape[0] // 64)].float().cpu().numpy().tobytes())
    h.update(model.blocks[0].attn.wqkv.weight.detach()[:8].float().cpu().numpy().tobytes())
    return {
        "name": cfg.name,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "weights_sha256": h.hexdigest()[:16],
    }


@dataclass
class ActivationCache:
    """The memory-mapped arrays of one cache directory (see :func:`cache_activations`)."""

    path: Path
    meta: dict
    tokens: np.ndarray  # (n, S) int64
    hidden: dict[int, np.ndarray]  # exit step -> (n, S, d) float32
    top_p: np.ndarray  # (n, S, K) float16: final-layer probabilities, descending
    top_ids: np.ndarray  # (n, S, K) int32

    @classmethod
    def open(cls, path: str | Path) -> ActivationCache:
        path = Path(path)
        try:
            meta = json.loads((path / "cache.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not an activation cache ({e})") from None
        if meta.get("format") != CACHE_FORMAT:
            raise InputError(
                f"{path}: activation cache format {meta.get('format')}, expected {CACHE_FORMAT}"
            )
        n, S, K, d = meta["n"], meta["seq_len"], meta["topk"], meta["d_model"]

        def mm(name, dtype, shape):
            return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)

        return cls(
            path,
            meta,
            mm("tokens.i64", np.int64, (n, S)),
            {int(s): mm(f"hidden{s}.f32", np.float32, (n, S, d)) for s in meta["exit_steps"]},
            mm("top_p.f16", np.float16, (n, S, K)),
            mm("top_ids.i32", np.int32, (n, S, K)),
        )


def cache_activations(
    model,
    windows: np.ndarray,
    exit_steps: tuple[int, ...],
    out: str | Path,
    topk: int = 32,
    batch_size: int = 4,
    show: bool = True,
) -> ActivationCache:
    """Run the frozen ``model`` once over ``windows`` (n, S) and store, memory-mapped under
    ``out``: the states entering each exit in ``exit_steps`` (the output of that many plan
    steps) and the final distribution's top-``topk`` probabilities and ids. Atomic
    (``files.atomic_dir``): a killed run leaves no half cache behind."""
    out = Path(out)
    n, S = windows.shape
    d, L = model.config.d_model, model.n_steps
    if any(not 1 <= s < L for s in exit_steps):
        raise InputError(f"exit steps {list(exit_steps)} must be within [1, {L - 1}]")
    with atomic_dir(out, marker="cache.json") as tmp:

        def mm(name, dtype, shape):
            return np.memmap(tmp / name, dtype=dtype, mode="w+", shape=shape)

        toks = mm("tokens.i64", np.int64, (n, S))
        toks[:] = windows
        hid = {s: mm(f"hidden{s}.f32", np.float32, (n, S, d)) for s in exit_steps}
        tp = mm("top_p.f16", np.float16, (n, S, topk))
        ti = mm("top_ids.i32", np.int32, (n, S, topk))
        bar = progress(show, total=n * S, desc="caching activations", unit="tok")
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                x = torch.as_tensor(windows[i : i + batch_size])
                ctx = model.context(model.default_positions(x.shape, None))
                h = model.embed(x)
                for step in range(L):
                    h = model.run_step(step, h, ctx)
                    if step + 1 in hid:
                        hid[step + 1][i : i + len(x)] = h.float().numpy()
                p, ids = torch.softmax(model.logits(h).float(), dim=-1).topk(topk, dim=-1)
                tp[i : i + len(x)] = p.half().numpy()
                ti[i : i + len(x)] = ids.int().numpy()
                bar.update(x.numel())
        bar.close()
        for a in (toks, *hid.values(), tp, ti):
            a.flush()
        meta = {
            "format": CACHE_FORMAT,
            "n": n,
            "seq_len": S,
            "topk": topk,
            "d_model": d,
            "exit_steps": list(exit_steps),
            "model": model_fingerprint(model),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ActivationCache.open(out)


# ---------------------------------------------------------------------- the draft model
def draft_model(model, exit_step: int, adapter_rank: int = 0, seed: int = 0):
    """``model`` with one exit after ``exit_step`` steps carrying an attention adapter and
    its own norm, initialised from what the full model runs next there: block
    ``exit_step``'s attention and input norm, and the final norm; with ``adapter_rank`` also
    a residual low-rank MLP after the attention (zero-initialised output: it starts as a
    no-op). Shares the body's tensors (no copy); only the exit's parameters require
    gradients."""
    from earlyexit.config import ExitConfig
    from earlyexit.models.decoder import Decoder

    cfg = dataclasses.replace(
        model.config,
        exits=ExitConfig(steps=(exit_step,), norms=True, attention=True, adapter_rank=adapter_rank),
    )
    with torch.device("meta"):
        new = Decoder(cfg)
    state = dict(model.state_dict())
    nxt = model.blocks[model.plan[exit_step].block]
    state["exit_attention.0.norm.weight"] = nxt.attn_norm.weight.detach().clone()
    for k, v in nxt.attn.state_dict().items():
        state[f"exit_attention.0.attn.{k}"] = v.detach().clone()
    state["exit_norms.0.weight"] = model.norm.weight.detach().clone()
    if adapter_rank:
        from earlyexit.models.layers import ExitAdapter

        ad = ExitAdapter(model.config.d_model, adapter_rank).to(model.tok_embeddings.weight.dtype)
        ad.reset_parameters(torch.Generator().manual_seed(seed))
        for k, v in ad.state_dict().items():
            state[f"exit_adapters.0.{k}"] = v
    new.load_state_dict(state, assign=True, strict=True)
    new.rebuild_buffers(model.tok_embeddings.weight.device)
    for n, p in new.named_parameters():
        p.requires_grad_(n.startswith(("exit_attention.", "exit_norms.", "exit_adapters.")))
    return new


def draft_parameters(model) -> dict[str, Tensor]:
    """The tensors that make a draft (the exit's adapter and norm), by state-dict name."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(("exit_attention.", "exit_norms.", "exit_adapters."))
    }


def vocab_index(ids: Tensor, vocab_size: int) -> Tensor:
    """(V,) map from token id to its column in the pruned head (-1 outside it)."""
    m = torch.full((vocab_size,), -1, dtype=torch.long)
    m[ids] = torch.arange(len(ids))
    return m


def draft_logits(model, exit_step: int, h: Tensor, head_rows: Tensor) -> Tensor:
    """The draft's logits over the pruned vocabulary (B, S, N) for exit states ``h``
    (B, S, d) of whole windows (uncached, positions 0..S-1)."""
    ctx = model.context(model.default_positions(h.shape[:2], None))
    hn = model.exit_norm(h, exit_step, ctx)
    return F.linear(hn, head_rows)


def soft_targets(top_p: Tensor, top_ids: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The final distribution's top-K as (columns of the pruned head, probabilities), with
    tokens outside the pruned vocabulary given probability 0 (column 0, never matched)."""
    cols = index[top_ids.long()]
    p = top_p.float() * (cols >= 0)
    return cols.clamp_min(0), p


@dataclass
class DraftTrainConfig:
    exit_step: int
    adapter_rank: int = 0  # a residual MLP adapter after the attention (0: none)
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    threads: int | None = None


def _batch(cache: ActivationCache, exit_step: int, rows: np.ndarray, index: Tensor):
    """Cache windows ``rows`` (sorted: memmap reads in order) as tensors: the exit states
    (B, S, d) and the soft targets (columns of the pruned head, probabilities), and the
    final argmax ids (B, S)."""
    r = np.sort(rows)
    h = torch.from_numpy(np.ascontiguousarray(cache.hidden[exit_step][r]))
    top_ids = torch.from_numpy(np.ascontiguousarray(cache.top_ids[r])).long()
    top_p = torch.from_numpy(np.ascontiguousarray(cache.top_p[r]))
    cols, p = soft_targets(top_p, top_ids, index)
    return h, cols, p, top_ids[..., 0]


@torch.no_grad()
def evaluate_draft(
    model, cfg: DraftTrainConfig, cache: ActivationCache, rows: np.ndarray, head_rows, ids, index
) -> dict:
    """Held-out quality of the draft on cache windows ``rows``: top-1 agreement with the
    final layer's argmax (the greedy acceptance rate of one draft) and sum-min(p, q) over
    the final top-K (the expected acceptance of a sampled draft)."""
    agree = summin = count = 0.0
    for i in range(0, len(rows), cfg.batch_size):
        h, cols, p, final = _batch(cache, cfg.exit_step, rows[i : i + cfg.batch_size], index)
        q = torch.softmax(draft_logits(model, cfg.exit_step, h, head_rows).float(), -1)
        agree += (ids[q.argmax(-1)] == final).sum().item()
        summin += torch.minimum(p, q.gather(-1, cols) * (p > 0)).sum().item()
        count += h.shape[0] * h.shape[1]
    return {"agreement": agree / count, "sum_min": summin / count}


def train_draft(
    model,
    cache: ActivationCache,
    cfg: DraftTrainConfig,
    draft_ids: Tensor,
    train_rows: np.ndarray,
    eval_sets: dict[str, np.ndarray],
    run: str | Path,
    show: bool = True,
):
    """Train the attention-adapter draft of frozen ``model`` at ``cfg.exit_step`` on the
    cached activations, distilling the final top-K distribution into the draft's softmax
    over ``draft_ids`` (the pruned head). Resumes from ``run/state.safetensors`` (written
    atomically every ``save_every`` steps) exactly: same batches, same optimizer state.
    Returns the trained draft model and the metrics rows."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dm = draft_model(model, cfg.exit_step, cfg.adapter_rank, cfg.seed)
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    head_rows = model.head_weight().detach()[draft_ids].contiguous()  # (N, d)
    index = vocab_index(draft_ids, model.config.vocab_size)
    metrics_path, state_path = run / "metrics.jsonl", run / "state.safetensors"
    fp = {
        "config": dataclasses.asdict(cfg),
        "cache": cache.meta["model"],
        "n_draft": len(draft_ids),
    }
    fp["config"].pop("threads")
    step = 0
    if state_path.is_file():
        step = _load_state(state_path, dm, opt, fp)
        _truncate(metrics_path, step)
    epoch_len = len(train_rows) // cfg.batch_size
    if epoch_len == 0:
        raise InputError(
            f"{len(train_rows)} training windows: fewer than one batch of {cfg.batch_size}"
        )

    def order(epoch: int) -> np.ndarray:  # the same permutation on a resumed run
        return np.random.default_rng([cfg.seed, epoch]).permutation(train_rows)

    rows_out = []
    bar = progress(show, total=cfg.steps, desc=f"draft @{cfg.exit_step}", unit="step")
    bar.update(step)
    t0 = time.perf_counter()
    dm.train()
    while step < cfg.steps:
        perm = order(step // epoch_len)
        b = step % epoch_len
        h, cols, p, _ = _batch(
            cache, cfg.exit_step, perm[b * cfg.batch_size : (b + 1) * cfg.batch_size], index
        )
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup)
        logq = torch.log_softmax(draft_logits(dm, cfg.exit_step, h, head_rows).float(), -1)
        loss = -(p * logq.gather(-1, cols)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1, loss=f"{loss.item():.3f}")
        row = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
            dm.eval()
            row = {
                "step": step,
                "loss": round(loss.item(), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            for name, rows in eval_sets.items():
                for k, v in evaluate_draft(
                    dm, cfg, cache, rows, head_rows, draft_ids, index
                ).items():
                    row[f"{name}_{k}"] = round(v, 4)
            dm.train()
            bar.write(" ".join(f"{k} {v}" for k, v in row.items()))
            rows_out.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, dm, opt, step, fp)
    bar.close()
    dm.eval()
    return dm, rows_out


def _save_state(path: Path, dm, opt, step: int, fp: dict) -> None:
    """The draft's tensors and AdamW's moments in safetensors, the rest in JSON (no pickle:
    a checkpoint must not be able to run code), written to a temporary file and renamed."""
    from safetensors.torch import save_file

    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = {f"draft.{k}": v.contiguous() for k, v in draft_parameters(dm).items()}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step), "fingerprint": json.dumps(fp)})


def _load_state(path: Path, dm, opt, fp: dict) -> int:
    """Restore what :func:`_save_state` wrote; returns its step."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if json.loads(meta.get("fingerprint", "null")) != fp:
            raise InputError(f"{path}: written by a different draft run; use another --out")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items)
    dm.load_state_dict(
        {**dm.state_dict(), **{k[6:]: v for k, v in tensors.items() if k.startswith("draft.")}}
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if st:
            opt.state[p] = st
    return int(meta["step"])


def _truncate(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
