"""Benchmark ``mor-isoflop``: does Mixture-of-Recursions win at equal training compute?

    earlyexit bench mor-isoflop

Vanilla (8 layers), recursive (1 + 2 x 3 + 1, every token through every recursion) and
MoR (the same shape with expert-choice or token-choice routers) are trained from scratch on
the embedded corpus at the *same forward-FLOP budget* (the vanilla recipe's: 450 steps of
16 x 256 tokens; MoR's accountant turns it into more steps for the cheaper MoR models).
Missing runs are trained with their recipes (``stdlib-small``, ``stdlib-small-rec3``,
``stdlib-small-mor``, ``stdlib-small-mor-token``). Reported: validation NLL with causal
routing (what generation does), the non-causal top-k NLL beside it for MoR (labelled),
FLOPs per token, steps, tokens, unique non-embedding parameters, and the recursion shares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from earlyexit.bench.common import bench_device, environment, load_model, set_threads, write_rows
from earlyexit.evaluation.perplexity import perplexity
from earlyexit.training.flops import forward_flops_per_token
from earlyexit.training.loop import RECIPES, TrainConfig, train

RUNS = (
    ("vanilla (8 layers)", "stdlib-small"),
    ("recursive (1 + 2x3 + 1)", "stdlib-small-rec3"),
    ("MoR expert-choice (1 + 2x3 + 1)", "stdlib-small-mor"),
    ("MoR token-choice (1 + 2x3 + 1)", "stdlib-small-mor-token"),
)


def run(
    data: str = "data/stdlib",
    threads: int | None = None,
    out: str | None = "results/mor_isoflop.json",
    precision: str = "auto",
) -> list[dict]:
    from earlyexit.training.data import Windows, token_file, val_batches

    threads = set_threads(threads)
    env = environment(threads)
    rows = []
    for label, recipe in RUNS:
        cfg = TrainConfig(**{**RECIPES[recipe], "data": data, "precision": precision})
        final = Path(cfg.out) / "final"
        if not final.is_dir():
            print(f"  training {recipe} ...", flush=True)
            train(
                cfg,
                resume=(Path(cfg.out) / "latest").exists(),
                progress=False,
                log=lambda *a, **k: None,
            )
        lm = load_model(final)
        mc = lm.config
        state = __import__("json").loads((Path(cfg.out) / "train_config.json").read_text())
        res = perplexity(str(final), data, seq_len=cfg.seq_len, batch_size=8, device=bench_device())
        row = {
            "bench": "mor-isoflop",
            "label": label,
            "recipe": recipe,
            "val_nll": res["nll"],
            "forward_flops_per_token": forward_flops_per_token(mc, cfg.seq_len),
            "steps": state["steps"],
            "tokens": state["steps"]
            * state["batch_size"]
            * state["seq_len"]
            * state.get("world_size", 1),
            "non_embedding_params": mc.param_counts()["non_embedding"],
            "env": env,
        }
        if mc.router.kind != "none":
            row["val_nll_topk_noncausal"] = perplexity(
                str(final),
                data,
                seq_len=cfg.seq_len,
                batch_size=8,
                device=bench_device(),
                routing="topk",
            )["nll"]
            windows = Windows(token_file(data, "val"), cfg.seq_len)
            runs = []
            with torch.inference_mode():
                for x, _ in val_batches(windows, 8, 4):
                    runs.append(lm.model(x, return_routing=True).recursions.flatten())
            hist = np.bincount(torch.cat(runs).numpy(), minlength=mc.sharing.loops + 1)[1:]
            row["recursion_shares_causal"] = (hist / hist.sum()).tolist()
        row["compute_budget"] = row["forward_flops_per_token"] * row["tokens"]
        rows.append(row)
        extra = (
            f"  top-k (non-causal) {row['val_nll_topk_noncausal']:.4f}"
            if "val_nll_topk_noncausal" in row
            else ""
        )
        print(
            f"  {label:34s} NLL {row['val_nll']:.4f}{extra}  steps {row['steps']}  params {row['non_embedding_params'] / 1e6:.2f}M",
            flush=True,
        )
    write_rows(rows, out)
    return rows
