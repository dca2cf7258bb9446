"""Dense -> recursive conversion and back (Relaxed Recursive Transformers, arXiv 2410.20672 §1-2).

- ``convert_recursive``: a dense model becomes one whose L steps run K shared blocks in a
  sharing scheme (cycle, sequence, middle-cycle, middle-sequence; ``plan.py``). Everything in
  a block is tied, norms included; embedding, final norm, head (and exits) stay unique.
- Initialisation of the shared blocks (§1): ``stepwise`` takes dense layers
  round(linspace(0, L-1, K)) (Python's round-half-even, as the authors' code; over layers
  1..L-2 for the middle schemes, whose first and last layers stay unique); ``average`` the
  mean of the layers tied to the block; ``lower`` the first K layers; ``random`` none.
- Relaxation (§2): per-step LoRA initialised from the truncated SVD of (the step's dense
  weight - the shared weight) in fp32, or standard init (``lora_init="zero"``, or wherever
  the residual is exactly zero). ``lora_init="asvd"`` (ours, not the paper's) truncates the
  residual as it acts on the source layer's inputs over calibration tokens
  (``lora.whitened_svd``): the same rank spent where the activations are.
  ``lora_init="sequential"`` fits step after step, each linear in order (q/k/v, o,
  gate/up, down) on the *converted* model's inputs so far, toward what the source layer
  outputs from its own inputs (``lora.drift_corrected``): it also corrects the drift that
  earlier shared layers leave in the hidden states.
- Norms and biases (``LoraConfig.norms`` / ``biases``): each relaxed step's offsets start
  at (its dense layer's norm weights and biases - the shared ones) under ``svd`` init, so a
  full-rank relaxation reproduces any source, Qwen2's q/k/v biases and per-layer norms
  included; zero under ``zero`` init.
- ``unroll``: the equivalent dense model, each step's weights = shared weights + its merged
  LoRA and offsets (export to Hugging Face, analysis, tests).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from earlyexit.config import LORA_TARGETS, LoraConfig, SharingConfig
from earlyexit.errors import ConfigError
from earlyexit.models.decoder import Decoder
from earlyexit.models.lora import drift_corrected, truncated_svd, whitened_svd

INITS = ("stepwise", "average", "lower", "random")
LORA_INITS = ("svd", "asvd", "sequential", "zero")
CALIBRATED = ("asvd", "sequential")  # the LoRA inits that need calibration tokens
# the linear inside a block whose input each LoRA target sees (q/k/v share the fused one)
TARGET_INPUT = {
    "q": "attn.wqkv",
    "k": "attn.wqkv",
    "v": "attn.wqkv",
    "o": "attn.wo",
    "gate": "mlp.w13",
    "up": "mlp.w13",
    "down": "mlp.w2",
}


def stepwise_indices(first: int, last: int, k: int) -> list[int]:
    """round(linspace(first, last, k)) with Python's round-half-even (the authors' code)."""
    return [round(float(x)) for x in np.linspace(first, last, k)]


def target_weight(block, target: str) -> torch.Tensor:
    """The (d_out, d_in) weight of a LoRA target inside a block (a view into the fused ones)."""
    a, m = block.attn, block.mlp
    q, kv = a.q_dim, a.kv_dim
    return {
        "q": lambda: a.wqkv.weight[:q],
        "k": lambda: a.wqkv.weight[q : q + kv],
        "v": lambda: a.wqkv.weight[q + kv :],
        "o": lambda: a.wo.weight,
        "gate": lambda: m.w13.weight[: m.d_ff],
        "up": lambda: m.w13.weight[m.d_ff :],
        "down": lambda: m.w2.weight,
    }[target]()


def convert_recursive(
    dense: Decoder,
    loops: int,
    scheme: str = "cycle",
    init: str = "stepwise",
    lora: LoraConfig | None = None,
    lora_init: str = "svd",
    seed: int = 0,
    calibration: torch.Tensor | None = None,
) -> Decoder:
    """A recursive (optionally relaxed) model initialised from ``dense``.

    ``calibration``: token ids (N, T) run through ``dense`` (and, for ``sequential``, the
    converted model) to measure each linear's input moments; required by (and only used
    by) the calibrated inits, ``asvd`` and ``sequential``.

    Raises:
        ConfigError: ``dense`` already shares layers, the layer count does not split into
            ``loops`` recursions for ``scheme``, an unknown init, or a calibrated init
            without (N, T) calibration tokens.
    """
    cfg = dense.config
    if cfg.sharing.scheme != "none":
        raise ConfigError(
            f"the model already shares layers ({cfg.sharing.scheme} x {cfg.sharing.loops}); convert a dense model"
        )
    if scheme == "none":
        raise ConfigError(
            "choose a sharing scheme: cycle, sequence, middle_cycle or middle_sequence"
        )
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if lora_init not in LORA_INITS:
        raise ConfigError(f"unknown LoRA init {lora_init!r}; choose {', '.join(LORA_INITS)}")
    if lora_init in CALIBRATED:
        if calibration is None:
            raise ConfigError(
                f"the {lora_init} LoRA init needs calibration tokens (--calibration-data)"
            )
        _check_calibration(calibration)
    lora = lora or LoraConfig()
    new_cfg = dataclasses.replace(
        cfg, name=f"{cfg.name}-{scheme}x{loops}", sharing=SharingConfig(scheme, loops), lora=lora
    )
    g = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = Decoder(new_cfg)
    model.init_weights(g)
    model = model.to(dense.tok_embeddings.weight.device, dense.tok_embeddings.weight.dtype)
    src = dense.state_dict()
    own = model.state_dict()
    with torch.no_grad():
        for k, v in src.items():  # embedding, final norm, head, exit norms and classifiers
            if not k.startswith("blocks."):
                own[k].copy_(v)
        steps_of = {
            b: [i for i, s in enumerate(new_cfg.plan) if s.block == b]
            for b in range(new_cfg.n_blocks)
        }
        shared = [b for b, steps in steps_of.items() if len(steps) > 1]
        middle = scheme.startswith("middle_")
        chosen = stepwise_indices(
            1 if middle else 0, cfg.n_layers - (2 if middle else 1), len(shared)
        )
        for b, steps in steps_of.items():
            if len(steps) == 1:
                sources = steps  # a unique block keeps its own layer
            elif init == "stepwise":
                sources = [chosen[shared.index(b)]]
            elif init == "lower":
                sources = [shared.index(b) + (1 if middle else 0)]
            elif init == "average":
                sources = steps
            else:  # random
                continue
            _copy_block_mean(dense, sources, model.blocks[b])
        if new_cfg.lora.enabled and lora_init == "sequential":
            for i, step in enumerate(new_cfg.plan):
                if step.lora is not None:
                    _relax_norms_and_biases(dense.blocks[i], model.blocks[step.block], step.lora)
            _fit_sequential(dense, model, calibration)
        elif new_cfg.lora.enabled and lora_init in ("svd", "asvd"):
            moments = None
            if lora_init == "asvd":
                relaxed = [i for i, s in enumerate(new_cfg.plan) if s.lora is not None]
                moments = input_moments(dense, calibration, relaxed)
            for i, step in enumerate(new_cfg.plan):
                if step.lora is None:
                    continue
                blk = model.blocks[step.block]
                _relax_norms_and_biases(dense.blocks[i], blk, step.lora)
                for t in blk.lora.shapes:
                    residual = (
                        target_weight(dense.blocks[i], t).float() - target_weight(blk, t).float()
                    )
                    if not residual.any():
                        continue  # zero residual: keep the standard init (delta starts at 0)
                    r = blk.lora.shapes[t][0]
                    if moments is None:
                        bm, am = truncated_svd(residual, r)
                    else:
                        bm, am = whitened_svd(residual, moments[i, TARGET_INPUT[t]], r)
                    blk.lora.B[t][step.lora].copy_(bm)
                    blk.lora.A[t][step.lora].copy_(am)
    return model


# the order a sequential fit sets a step's linears in: each one's inputs depend on the last
FIT_ORDER = ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")


def _fit_sequential(dense: Decoder, model: Decoder, tokens: torch.Tensor, batch_size: int = 4):
    """``lora_init="sequential"``: for each relaxed step i in order, and each of its linears
    in ``FIT_ORDER``, measure E[x_r x_r^T] and E[x_d x_r^T] over ``tokens`` (x_r: the
    converted model's input to that linear, with every earlier LoRA already set; x_d: the
    source layer i's, from the source's own hidden states), then set the LoRA of the
    targets reading that input to the rank-r truncation (``whitened_svd`` over x_r) of the
    ``drift_corrected`` delta. Costs ~5 uncached forwards of both models over ``tokens``."""
    dev = dense.tok_embeddings.weight.device
    chunks = [c.to(dev) for c in tokens.split(batch_size)]
    with torch.inference_mode():
        ctx_d = [dense.context(dense.default_positions(c.shape, None)) for c in chunks]
        ctx_r = [model.context(model.default_positions(c.shape, None)) for c in chunks]
        h_d = [dense.embed(c) for c in chunks]
        h_r = [model.embed(c) for c in chunks]
    for i, step in enumerate(model.plan):
        blk = model.blocks[step.block]
        if step.lora is not None:
            for path in FIT_ORDER:
                targets = [t for t in blk.lora.shapes if TARGET_INPUT[t] == path]
                if not targets:
                    continue
                c_rr, c_dr = _paired_moments(dense, model, i, path, h_d, h_r, ctx_d, ctx_r)
                with torch.no_grad():
                    for t in targets:
                        w_src = target_weight(dense.blocks[i], t)
                        residual = w_src.float() - target_weight(blk, t).float()
                        delta = drift_corrected(residual, w_src, c_rr, c_dr)
                        bm, am = whitened_svd(delta, c_rr, blk.lora.shapes[t][0])
                        blk.lora.B[t][step.lora].copy_(bm)
                        blk.lora.A[t][step.lora].copy_(am)
        with torch.inference_mode():  # both models' states after step i, for step i + 1
            h_d = [dense.run_step(i, h, c) for h, c in zip(h_d, ctx_d)]
            h_r = [model.run_step(i, h, c) for h, c in zip(h_r, ctx_r)]


def _paired_moments(dense, model, i, path, h_d, h_r, ctx_d, ctx_r):
    """(E[x_r x_r^T], E[x_d x_r^T]), float64, of the inputs of linear ``path`` in step ``i``
    of the converted model and in layer ``i`` of the source, over the same positions."""
    seen: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            seen[key] = args[0].reshape(-1, args[0].shape[-1]).double()

        return hook

    hooks = [
        dense.blocks[i].get_submodule(path).register_forward_pre_hook(grab("d")),
        model.blocks[model.plan[i].block].get_submodule(path).register_forward_pre_hook(grab("r")),
    ]
    c_rr = c_dr = 0
    n = 0
    try:
        with torch.inference_mode():
            for hd, hr, cd, cr in zip(h_d, h_r, ctx_d, ctx_r):
                dense.run_step(i, hd, cd)
                model.run_step(i, hr, cr)
                xd, xr = seen["d"], seen["r"]
                c_rr = c_rr + xr.mT @ xr
                c_dr = c_dr + xd.mT @ xr
                n += len(xr)
    finally:
        for h in hooks:
            h.remove()
    return (c_rr / n).cpu(), (c_dr / n).cpu()


def _check_calibration(tokens: torch.Tensor) -> None:
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ConfigError(
            f"calibration tokens must be a non-empty (N, T) array, got {tuple(tokens.shape)}"
        )


def input_moments(
    dense: Decoder, tokens: torch.Tensor, layers: list[int], batch_size: int = 4
) -> dict[tuple[int, str], torch.Tensor]:
    """E[x x^T] (float64, (d_in, d_in)) of the input of each LoRA-relaxable linear
    (``TARGET_INPUT``'s values) of dense ``layers``, over every position of ``tokens``
    (N, T) run through ``dense`` (no cache, causal), ``batch_size`` rows at a time."""
    _check_calibration(tokens)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def hook(key):
        def add(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.mT @ x

        return add

    for i in layers:
        for path in set(TARGET_INPUT.values()):
            mod = dense.blocks[i].get_submodule(path)
            hooks.append(mod.register_forward_pre_hook(hook((i, path))))
    dev = dense.tok_embeddings.weight.device
    try:
        with torch.inference_mode():
            for rows in tokens.split(batch_size):
                dense(rows.to(dev))
    finally:
        for h in hooks:
            h.remove()
    n = tokens.numel()
    return {k: (v / n).cpu() for k, v in sums.items()}


# (module path inside a block, LoRA bank key) of each relaxable norm weight and bias
NORMS = (("attn_norm", "attn"), ("mlp_norm", "mlp"))
BIASES = (("attn.wqkv", "qkv"), ("attn.wo", "o"), ("mlp.w13", "w13"), ("mlp.w2", "w2"))


def _relax_norms_and_biases(source, block, slot: int) -> None:
    """Set ``block``'s norm and bias offsets of LoRA ``slot`` to (source layer - shared):
    the relaxed step then has exactly the source layer's norms and biases."""
    bank = block.lora
    for path, key in NORMS if bank.norm is not None else ():
        own, shared = source.get_submodule(path).weight, block.get_submodule(path).weight
        bank.norm[key][slot].copy_(own.float() - shared.float())
    for path, key in BIASES if bank.bias is not None else ():
        if key in bank.bias:
            own, shared = source.get_submodule(path).bias, block.get_submodule(path).bias
            bank.bias[key][slot].copy_(own.float() - shared.float())


def _copy_block_mean(dense: Decoder, layers: list[int], block) -> None:
    """Set every non-LoRA tensor of ``block`` to the mean of those of dense ``layers``."""
    states = [dense.blocks[i].state_dict() for i in layers]
    for k, v in block.state_dict().items():
        if k.startswith("lora."):
            continue
        v.copy_(torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype))


def unroll(model: Decoder) -> Decoder:
    """The dense model ``model`` computes: step i's block copied, plus its merged LoRA."""
    cfg = model.config
    dense_cfg = dataclasses.replace(
        cfg, name=f"{cfg.name}-unrolled", sharing=SharingConfig(), lora=LoraConfig()
    )
    with torch.device("meta"):
        dense = Decoder(dense_cfg)
    sd = {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("blocks.")
    }
    for i, step in enumerate(cfg.plan):
        blk = model.blocks[step.block]
        for k, v in blk.state_dict().items():
            if not k.startswith("lora."):
                sd[f"blocks.{i}.{k}"] = v.detach().clone()
    dense.load_state_dict(sd, assign=True)
    dense.rebuild_buffers(model.tok_embeddings.weight.device)
    with torch.no_grad():
        for i, step in enumerate(cfg.plan):
            blk = model.blocks[step.block]
            if step.lora is None or blk.lora is None:
                continue
            for t in LORA_TARGETS:
                delta = blk.lora.merged_delta(t, step.lora)
                if delta is not None:
                    target_weight(dense.blocks[i], t).add_(
                        delta.to(target_weight(dense.blocks[i], t).dtype)
                    )
            for path, key in NORMS if blk.lora.norm is not None else ():
                dense.blocks[i].get_submodule(path).weight.add_(blk.lora.norm[key][step.lora])
            for path, key in BIASES if blk.lora.bias is not None else ():
                if key in blk.lora.bias:
                    dense.blocks[i].get_submodule(path).bias.add_(blk.lora.bias[key][step.lora])
    return dense.eval()
