"""The model a run trains and the optimizer's view of it: from a preset or config file
(with the data's vocabulary), from a checkpoint with the run's exit settings applied,
partly frozen (``--train-only``), and AdamW parameter groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from earlyexit.config import ExitConfig, ModelConfig
from earlyexit.errors import ConfigError, InputError
from earlyexit.io.checkpoint import load_checkpoint, load_config
from earlyexit.io.registry import resolve_model
from earlyexit.models.decoder import Decoder
from earlyexit.models.layers import RMSNorm
from earlyexit.tokenizer import Tokenizer
from earlyexit.training.config import TrainConfig


def build_config(cfg: TrainConfig, tokenizer: Tokenizer, eot: int) -> ModelConfig:
    """The model config: preset or file, with the vocabulary of the data's tokenizer."""
    over = {"vocab_size": tokenizer.vocab_size, "eos_token_ids": [eot]}
    if Path(cfg.model).suffix == ".json":
        mc = ModelConfig.load(cfg.model)
        data = mc.to_dict()
        data.pop("plan")
        return ModelConfig.from_dict({**data, **over}, source=cfg.model)
    return ModelConfig.from_name(cfg.model, **over)


def exit_config(current: ExitConfig, cfg: TrainConfig) -> ExitConfig:
    """The model's exits with the run's ``exit_*`` settings applied."""
    return dataclasses.replace(
        current,
        steps=current.steps if cfg.exit_steps is None else tuple(cfg.exit_steps),
        norms=current.norms or cfg.exit_norms,
        classifier=current.classifier or cfg.exit_classifier,
        adapter_rank=current.adapter_rank
        if cfg.exit_adapter_rank is None
        else cfg.exit_adapter_rank,
    )


def with_exits(model: Decoder, cfg: TrainConfig) -> Decoder:
    """``model`` with the run's exit settings; new per-exit norms start as copies of the
    final norm, new classifiers at random, everything else keeps its trained weights."""
    exits = exit_config(model.config.exits, cfg)
    if exits == model.config.exits:
        return model
    mc = dataclasses.replace(model.config, exits=exits)
    dev = model.tok_embeddings.weight.device
    new = Decoder(mc).to(dev)
    # new exit parts start from the run's seed: two runs of one recipe start identically
    new.init_weights(torch.Generator(device=dev).manual_seed(cfg.seed))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    exit_parts = ("exit_norms.", "exit_classifiers.", "exit_adapters.", "exit_attention.")
    stale = [k for k in unexpected if not k.startswith(exit_parts)]
    if stale or any(not k.startswith(exit_parts) for k in missing):
        raise ConfigError(f"cannot change the exits of {cfg.init_from}: {stale or missing}")
    if new.exit_norms is not None:
        for i, s in enumerate(mc.exits.steps):
            old = model.exit_index(s)
            src = model.norm if old is None or model.exit_norms is None else model.exit_norms[old]
            new.exit_norms[i].weight.data.copy_(src.weight.data)
    return new


def freeze_all_but(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Train only the parameters whose names start with one of ``prefixes``; returns how
    many parameter tensors were frozen. Refuses a pattern that matches nothing."""
    names = [n for n, _ in model.named_parameters()]
    for pre in prefixes:
        if not any(n.startswith(pre) for n in names):
            raise ConfigError(f"--train-only {pre!r} matches no parameter of this model")
    frozen = 0
    for n, p in model.named_parameters():
        keep = n.startswith(tuple(prefixes))
        p.requires_grad_(keep and p.requires_grad)
        frozen += not keep
    return frozen


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on linear matrices only; not on norms, biases or embeddings."""
    decay, no_decay = [], []
    no_decay_ids = set()
    for m in model.modules():
        if isinstance(m, (RMSNorm, torch.nn.Embedding)):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        offset = ".lora.norm." in name or ".lora.bias." in name  # relaxed norms and biases
        (no_decay if p.ndim < 2 or offset or id(p) in no_decay_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    aux = getattr(getattr(model, "routers", None), "aux", None)
    if aux is not None:  # MoR's auxiliary router: its own group at 10x the learning rate
        ids = {id(p) for p in aux.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": list(aux.parameters()), "weight_decay": 0.0, "lr_scale": 10.0})
    return groups


def initial_model(
    cfg: TrainConfig,
    ckpt: Path | None,
    tokenizer: Tokenizer,
    tok_path: Path,
    eot_id: int,
    device: torch.device,
) -> tuple[Decoder, ModelConfig]:
    """The model a run starts from, in training mode: the shape of the checkpoint being
    resumed (its weights are loaded by the caller, after the fingerprint check), ``init_from`` with the run's
    exit settings, or a fresh model of ``cfg.model`` initialised from ``cfg.seed``."""
    if ckpt is not None:  # resuming: the run's own config (weights: the caller)
        mc = load_config(ckpt)
        model = Decoder(mc).to(device)
        model.train()
    elif cfg.init_from:
        model, _ = load_checkpoint(resolve_model(cfg.init_from), device)
        model = with_exits(model, cfg)
        model.train()
        mc = model.config
        if tokenizer.vocab_size > mc.vocab_size:
            raise InputError(
                f"{tok_path}: {tokenizer.vocab_size} tokens do not fit the vocabulary of {cfg.init_from} ({mc.vocab_size})"
            )
    else:
        mc = build_config(cfg, tokenizer, eot_id)
        mc = dataclasses.replace(mc, exits=exit_config(mc.exits, cfg))
        torch.manual_seed(cfg.seed)
        model = Decoder(mc).to(device)
        model.init_weights(torch.Generator(device=device).manual_seed(cfg.seed))
        model.train()
    return model, mc
