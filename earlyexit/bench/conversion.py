"""Benchmark ``conversion``: how good is a recursive model converted from a dense one?

    earlyexit bench conversion --source runs/stdlib-small/final --data data/stdlib --steps 120

Every variant gets the same uptraining (``steps`` x batch x seq_len tokens, forward-KL
distillation from the dense source, the recursive paper's recipe) and is scored by
validation NLL before and after, next to the dense source (as is, and uptrained on the same
tokens) and a same-size dense model (as many unique blocks as the recursive one) trained
from scratch on the same tokens. Variants: the four initialisations without LoRA, and
LoRA at a few ranks with SVD vs zero init. Writes JSON rows; prints a table.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from earlyexit.bench.common import bench_device, environment, set_threads, write_rows
from earlyexit.config import LoraConfig
from earlyexit.evaluation.perplexity import perplexity
from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
from earlyexit.models.recursive import convert_recursive
from earlyexit.training.loop import TrainConfig, train

VARIANTS = (
    # (label, init, lora rank, lora init)
    ("stepwise", "stepwise", 0, "svd"),
    ("average", "average", 0, "svd"),
    ("lower", "lower", 0, "svd"),
    ("random", "random", 0, "svd"),
    ("average + LoRA 16 (SVD)", "average", 16, "svd"),
    ("average + LoRA 16 (zero)", "average", 16, "zero"),
    ("average + LoRA 64 (SVD)", "average", 64, "svd"),
    ("average + LoRA 64 (zero)", "average", 64, "zero"),
    ("stepwise + LoRA 64 (SVD)", "stepwise", 64, "svd"),
)


def run(
    source: str,
    data: str,
    work: str = "runs/bench-conversion",
    loops: int = 2,
    steps: int = 120,
    lr: float = 1e-3,
    threads: int | None = None,
    out: str | None = "results/conversion.json",
    variants=VARIANTS,
    precision: str = "auto",
) -> list[dict]:
    threads = set_threads(threads)
    env = environment(threads)
    work_dir = Path(work)
    dense, tok = load_checkpoint(source)
    base = dict(
        data=data,
        seq_len=256,
        batch_size=16,
        steps=steps,
        lr=lr,
        warmup_steps=10,
        precision=precision,
        eval_every=0,
        save_every=0,
        log_every=10,
        device=bench_device(),
    )
    quiet = {"progress": False, "log": lambda *a, **k: None}

    def fresh(name: str) -> str:  # reruns start over instead of refusing an existing run
        shutil.rmtree(work_dir / name, ignore_errors=True)
        return str(work_dir / name)

    def nll(model_dir) -> float:
        return perplexity(model_dir, data, seq_len=256, batch_size=8, device=bench_device())["nll"]

    rows = []

    def record(label, kind, model_dir, before, summary, seconds, params):
        after = nll(model_dir) if summary is not None else before
        row = {
            "bench": "conversion",
            "label": label,
            "kind": kind,
            "loops": loops,
            "steps": steps,
            "tokens": summary["tokens"] if summary else 0,
            "val_nll_before": before,
            "val_nll_after": after,
            "non_embedding_params": params,
            "seconds": seconds,
            "env": env,
        }
        rows.append(row)
        print(
            f"  {label:28s} params {params / 1e6:5.2f}M  NLL {before if before is not None else float('nan'):.4f} -> {after:.4f}",
            flush=True,
        )

    src_nll = nll(source)
    record(
        "dense source (no uptraining)",
        "source",
        source,
        src_nll,
        None,
        0.0,
        dense.config.param_counts()["non_embedding"],
    )
    t = time.perf_counter()
    s = train(TrainConfig(**base, init_from=source, out=fresh("dense-uptrained")), **quiet)
    record(
        "dense source, uptrained",
        "source",
        s["final"],
        src_nll,
        s,
        time.perf_counter() - t,
        dense.config.param_counts()["non_embedding"],
    )
    for label, init, rank, lora_init in variants:
        model = convert_recursive(dense, loops, "cycle", init, LoraConfig(rank=rank), lora_init)
        init_dir = save_checkpoint(model, work_dir / f"init-{_slug(label)}", tok)
        before = nll(init_dir)
        t = time.perf_counter()
        s = train(
            TrainConfig(
                **base,
                init_from=str(init_dir),
                objective="uptrain",
                teacher=source,
                out=fresh(f"up-{_slug(label)}"),
            ),
            **quiet,
        )
        record(
            label,
            "recursive",
            s["final"],
            before,
            s,
            time.perf_counter() - t,
            model.config.param_counts()["non_embedding"],
        )
    # same unique size as the recursive models, trained from scratch on the same tokens
    small = dataclasses.replace(
        dense.config, n_layers=dense.config.n_layers // loops, name="scratch"
    )
    cfg_file = work_dir / "scratch-config.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    small.save(cfg_file)
    t = time.perf_counter()
    s = train(
        TrainConfig(**{**base, "lr": 3e-3}, model=str(cfg_file), out=fresh("scratch")), **quiet
    )
    record(
        f"{small.n_layers}-layer dense from scratch",
        "scratch",
        s["final"],
        None,
        s,
        time.perf_counter() - t,
        small.param_counts()["non_embedding"],
    )
    write_rows(rows, out)
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
