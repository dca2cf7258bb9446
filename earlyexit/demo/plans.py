"""The demo's sizes: :class:`DemoPlan` (``FULL``, the embedded default, and ``QUICK``, the
seconds-long CI version), :class:`UserExitPlan` (the exit fine-tune of ``demo --model``),
and the small rules both use. ``pipeline.py`` turns a plan into training stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from earlyexit.config import STDLIB_SMALL


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (``FULL`` or ``QUICK``)."""

    corpus: tuple[str, ...]  # prepare --corpus
    vocab_size: int
    model: dict  # ModelConfig fields (the vocabulary comes from the data)
    seq_len: int
    batch_size: int
    dense_steps: int
    uptrain_steps: int
    loop_exit_steps: int
    mor_loops: int
    lora_rank: int
    lr: float
    prompts: int  # batch-1 strategy evaluation
    prompt_len: int
    new_tokens: int
    requests: int  # engine request stream
    mean_len: int
    max_batch: int
    eval_batches: int
    rounds: int  # interleaved timing repeats of every measurement (the spread of a finding)
    # Cost of one step of each stage relative to one dense step, and of the corpus and the
    # measurements in dense steps (measured on a 2-core AMD EPYC, AVX2 only, fp32,
    # 2026-11-30; the probe times a dense step on the user's machine, scales them to it, and
    # the estimate is revised as stages run)
    relative_cost: dict = field(default_factory=dict)


# The embedded default: stdlib-small's shape, fewer steps than its own recipe (BENCHMARKS.md).
FULL = DemoPlan(
    corpus=("stdlib",),
    vocab_size=STDLIB_SMALL["vocab_size"],
    model={k: v for k, v in STDLIB_SMALL.items() if k != "vocab_size"},
    seq_len=256,
    batch_size=16,
    dense_steps=200,
    uptrain_steps=60,
    loop_exit_steps=40,
    mor_loops=3,
    lora_rank=16,
    lr=2e-3,
    prompts=8,
    prompt_len=32,
    new_tokens=48,
    requests=64,
    mean_len=48,
    max_batch=16,
    eval_batches=16,
    rounds=3,
    relative_cost={
        "dense": 1.0,
        "uptrain": 1.45,
        "loop_exit": 1.36,
        "mor": 0.82,
        "prepare": 55.0,
        "measure": 140.0,  # 9.1 min of decode + engine rounds at 3.9 s per dense step
    },
)

# --quick: seconds, for CI. A few standard-library packages, a 4-layer model, a few steps;
# the numbers it prints are not meaningful, the path through every component is.
QUICK = DemoPlan(
    corpus=("stdlib:json/*.py", "stdlib:html/*.py", "stdlib:urllib/*.py"),
    vocab_size=384,
    model=dict(
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_context=256,
        tie_embeddings=True,
    ),
    seq_len=64,
    batch_size=8,
    dense_steps=12,
    uptrain_steps=4,
    loop_exit_steps=4,
    mor_loops=2,
    lora_rank=4,
    lr=3e-3,
    prompts=2,
    prompt_len=16,
    new_tokens=8,
    requests=6,
    mean_len=8,
    max_batch=4,
    eval_batches=2,
    rounds=3,
    relative_cost={
        "dense": 1.0,
        "uptrain": 1.5,
        "loop_exit": 1.4,
        "mor": 1.2,
        "prepare": 40.0,
        "measure": 300.0,
    },
)


@dataclass(frozen=True)
class UserExitPlan:
    """``demo --model``: a pretrained model without trained exits gets one, fine-tuned on
    the corpus with its body frozen (an exit adapter and norm, CE + KL to the final output:
    the full-depth model stays exactly the user's)."""

    exit_fraction: float  # the exit sits after this fraction of the layers
    adapter_rank: int
    steps: int
    seq_len: int
    batch_size: int
    lr: float


USER_EXIT_FULL = UserExitPlan(
    exit_fraction=1 / 3, adapter_rank=256, steps=120, seq_len=256, batch_size=4, lr=2e-3
)
USER_EXIT_QUICK = UserExitPlan(
    exit_fraction=1 / 3, adapter_rank=8, steps=4, seq_len=32, batch_size=2, lr=2e-3
)


def user_exit_step(n_layers: int, up: UserExitPlan) -> int:
    """Where ``demo --model`` puts a user model's exit: ``up.exit_fraction`` of its layers."""
    return max(1, min(n_layers - 1, round(n_layers * up.exit_fraction)))


def exit_steps(n_layers: int) -> tuple[int, ...]:
    """FREE's shallow exit: after a quarter of the layers (2 of 8), within [1, L-1]."""
    return (max(1, min(n_layers - 1, round(n_layers / 4))),)


def corpus_spec(plan: DemoPlan) -> list[str]:
    """``stdlib:PKG`` names one package of the running interpreter's standard library."""
    import sysconfig

    out = []
    for c in plan.corpus:
        if c.startswith("stdlib:"):
            out.append(str(Path(sysconfig.get_paths()["stdlib"]) / c.split(":", 1)[1]))
        else:
            out.append(c)
    return out
