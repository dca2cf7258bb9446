"""The demo's models: what it trains, where it caches them, and how it reuses them.

Three models on one prepared corpus (the interpreter's standard library by default):

- ``dense-exits``: a Llama-shaped decoder trained from scratch with FREE's shallow-deep loss
  and its shallow exit after a quarter of the layers, so one model serves the static, CALM,
  FREE and self-speculative strategies. (One exit, not CALM's three: on 2 cores the loss
  over three extra vocabulary-sized heads trains at a quarter of the speed, measured);
- ``recursive``: that model converted to a relaxed recursive one (cycle sharing, 2 loops,
  stepwise init, per-loop LoRA from the truncated SVD of the residuals), uptrained with
  distillation from its dense source, then given a loop exit after the first loop;
- ``mor``: a Mixture-of-Recursions model (middle-cycle, expert-choice routers) pretrained
  from scratch at the dense model's FLOP budget.

Every stage is a :class:`~earlyexit.training.loop.TrainConfig` run through the same loop the
CLI uses, so a stage interrupted by Ctrl-C or a kill resumes where it stopped on the next
run, and a finished stage (its ``final`` checkpoint exists and its recipe is unchanged) is
reused. Training precision follows the hardware (``--precision auto``): bf16 autocast where
bf16 is native, fp32 elsewhere. Each stage's TrainConfig keeps the precision as asked (so
the training log says ``auto: bf16 is native ...`` when auto chose it), and the resolved
precision is part of each stage's recipe (a cache from a machine that resolved it
differently is retrained).

Time estimates are measured, not assumed: :func:`probe_step_seconds` times one training
step of the dense model on this machine, :class:`Estimate` scales each stage's steps by
its cost relative to that step, and revises the scale as stages finish.
"""

from __future__ import annotations

# The plans (sizes) are in plans.py; these names stay importable from here.
__all__ = [
    "FULL",
    "QUICK",
    "USER_EXIT_FULL",
    "USER_EXIT_QUICK",
    "DemoPlan",
    "Estimate",
    "Stage",
    "UserExitPlan",
    "build",
    "corpus_spec",
    "exit_steps",
    "is_done",
    "probe_step_seconds",
    "probe_user_exit_step",
    "stages",
    "user_exit_stage",
]

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from earlyexit.demo.plans import (
    FULL,
    QUICK,
    USER_EXIT_FULL,
    USER_EXIT_QUICK,
    DemoPlan,
    UserExitPlan,
    corpus_spec,
    exit_steps,
    user_exit_step,
)
from earlyexit.errors import InputError
from earlyexit.progress import fmt_seconds


def user_exit_stage(
    plan: DemoPlan,
    up: UserExitPlan,
    model_dir: Path,
    work: Path,
    data: Path,
    threads: int = 0,
    device: str = "cpu",
    precision: str = "float32",
) -> Stage:
    """The exit fine-tune of a user's model (see :class:`UserExitPlan`). Its cost per step
    is not known here: :func:`probe_user_exit_step` times one step of it (the caller sets
    the stage's ``cost`` from that)."""
    from earlyexit.io.checkpoint import load_config
    from earlyexit.training.loop import TrainConfig

    mc = load_config(model_dir)
    n_layers = mc.n_layers  # the plan's depth
    step = user_exit_step(n_layers, up)
    resolved = _resolved(precision, device)
    cfg = TrainConfig(
        data=str(data),
        out=str(work / "runs" / "user-exit"),
        init_from=str(model_dir),
        objective="exits",
        exit_steps=(step,),
        exit_loss="aggressive",
        exit_norms=True,
        exit_adapter_rank=up.adapter_rank,
        train_only=("exit_",),
        seq_len=up.seq_len,
        batch_size=up.batch_size,
        steps=up.steps,
        lr=up.lr,
        warmup_steps=max(1, up.steps // 10),
        precision=precision,
        device=device,
        threads=threads,
        eval_every=0,
        eval_batches=2,
        save_every=max(1, up.steps // 4),
        keep_last=1,
        log_every=10,
    )
    return Stage(
        "user-exit",
        f"exit after {step} of {n_layers} layers, fine-tuned with the body frozen",
        cfg,
        eta_key="user_exit",
        steps=up.steps,
        inputs=(model_dir,),
        precision=resolved,
    )


def _model_file(work: Path, name: str, fields: dict) -> str:
    """Write a ModelConfig JSON for a from-scratch stage (the vocabulary comes from the data)."""
    path = work / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": f"demo-{name}", **fields}, indent=1) + "\n")
    return str(path)


RUNTIME_FIELDS = {"threads", "device"}


@dataclass
class Stage:
    """One cached training stage: a TrainConfig, or a conversion (``convert`` set)."""

    name: str
    title: str
    cfg: object | None = None  # TrainConfig
    convert: dict | None = None  # convert_recursive arguments (source = init checkpoint)
    source: str | None = None
    eta_key: str = ""
    steps: int = 0
    deps: tuple[str, ...] = ()  # stages whose output this one is built from
    inputs: tuple[Path, ...] = ()  # their final checkpoints
    cost: float | None = None  # seconds per step / the dense probe step's (else the table)
    precision: str | None = None  # the training precision cfg.precision resolves to here

    @property
    def final(self) -> Path:
        return Path(self.cfg.out) / "final" if self.cfg is not None else Path(self.convert["dst"])

    def recipe_hash(self) -> str:
        """The recipe and the exact weights of every input: a retrained input (even with an
        unchanged recipe) makes this stage stale."""
        body = dataclasses.asdict(self.cfg) if self.cfg is not None else self.convert
        # where and how fast it runs does not change the recipe
        body = {k: v for k, v in body.items() if k not in RUNTIME_FIELDS}
        if self.precision is not None and self.cfg is not None:
            body["precision"] = self.precision  # what ran, not how it was asked for
        body["inputs"] = [_weights_digest(p) for p in self.inputs]
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _resolved(precision: str, device: str) -> str:
    """``precision`` as training on ``device`` resolves it (``auto`` -> float32/bfloat16)."""
    import torch

    from earlyexit.device import resolve_precision

    return resolve_precision(precision, torch.device(device))[0]


def _weights_digest(ckpt: Path) -> str:
    f = Path(ckpt) / "model.safetensors"
    if not f.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stages(
    plan: DemoPlan,
    work: Path,
    data: Path,
    threads: int = 0,
    device: str = "cpu",
    precision: str = "float32",
) -> list[Stage]:
    """The training stages of ``plan`` under ``work`` (in dependency order), trained in
    ``precision`` as the user asked for it (``auto``, ``float32`` or ``bfloat16``; the
    loop resolves it for ``device`` and says why)."""
    from earlyexit.training.loop import TrainConfig

    resolved = _resolved(precision, device)

    runs = work / "runs"
    n_layers = plan.model["n_layers"]
    exits = exit_steps(n_layers)
    common = dict(
        data=str(data),
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        precision=precision,
        device=device,
        threads=threads,
        eval_batches=plan.eval_batches,
        keep_last=1,
        log_every=10,
    )
    dense = TrainConfig(
        **common,
        out=str(runs / "dense-exits"),
        model=_model_file(work, "dense", plan.model),
        objective="exits",
        exit_steps=exits,
        exit_loss="shallow-deep",
        steps=plan.dense_steps,
        lr=plan.lr,
        warmup_steps=max(1, plan.dense_steps // 10),
        eval_every=0,
        save_every=max(1, plan.dense_steps // 4),
    )
    dense_final = str(runs / "dense-exits" / "final")
    rec_init = str(runs / "recursive-init")
    rank = plan.lora_rank
    conversion = dict(
        src=dense_final,
        dst=rec_init,
        loops=2,
        scheme="cycle",
        init="stepwise",
        lora_rank=rank,
        lora_init="svd",
    )
    uptrain = TrainConfig(
        **common,
        out=str(runs / "recursive-uptrain"),
        init_from=rec_init,
        teacher=dense_final,
        objective="uptrain",
        exit_steps=(),
        steps=plan.uptrain_steps,
        lr=plan.lr / 2,
        warmup_steps=max(1, plan.uptrain_steps // 10),
        eval_every=0,
        save_every=max(1, plan.uptrain_steps // 2),
    )
    loop_exit = TrainConfig(
        **common,
        out=str(runs / "recursive"),
        init_from=str(runs / "recursive-uptrain" / "final"),
        objective="exits",
        exit_steps=(n_layers // 2,),
        exit_loss="aggressive",
        steps=plan.loop_exit_steps,
        lr=plan.lr / 2,
        warmup_steps=max(1, plan.loop_exit_steps // 10),
        eval_every=0,
        save_every=max(1, plan.loop_exit_steps // 2),
    )
    from earlyexit.training.flops import forward_flops_per_token

    mor_model = {
        **plan.model,
        "sharing": {"scheme": "middle_cycle", "loops": plan.mor_loops},
        "router": {"kind": "expert"},
    }
    budget = _dense_budget(plan, work, forward_flops_per_token)
    mor = TrainConfig(
        **common,
        out=str(runs / "mor"),
        model=_model_file(work, "mor", mor_model),
        objective="lm",
        flops_budget=budget,
        lr=plan.lr,
        warmup_steps=max(1, plan.dense_steps // 10),
        eval_every=0,
        save_every=max(1, plan.dense_steps // 4),
    )
    return [
        Stage(
            "dense-exits",
            "dense model with exits",
            dense,
            eta_key="dense",
            steps=plan.dense_steps,
            precision=resolved,
        ),
        Stage(
            "recursive-init",
            "relaxed recursive conversion",
            convert=conversion,
            deps=("dense-exits",),
            inputs=(Path(dense_final),),
            precision=resolved,
        ),
        Stage(
            "recursive-uptrain",
            "recursive uptraining (KD from dense)",
            uptrain,
            eta_key="uptrain",
            steps=plan.uptrain_steps,
            deps=("recursive-init", "dense-exits"),  # the dense model is its teacher
            inputs=(Path(rec_init), Path(dense_final)),
            precision=resolved,
        ),
        Stage(
            "recursive",
            "recursive loop exit",
            loop_exit,
            eta_key="loop_exit",
            steps=plan.loop_exit_steps,
            deps=("recursive-uptrain",),
            inputs=(runs / "recursive-uptrain" / "final",),
            precision=resolved,
        ),
        # MoR steps follow from the budget; ~ dense steps x dense FLOPs / MoR FLOPs
        Stage(
            "mor",
            "Mixture-of-Recursions pretraining",
            mor,
            eta_key="mor",
            steps=int(plan.dense_steps * 1.35),
            precision=resolved,
        ),
    ]


def _dense_budget(plan: DemoPlan, work: Path, flops_fn) -> float:
    """Forward FLOPs the dense stage spends: the MoR stage gets the same."""
    from earlyexit.config import ModelConfig

    cfg = ModelConfig(vocab_size=plan.vocab_size, **plan.model)
    return plan.dense_steps * plan.batch_size * plan.seq_len * flops_fn(cfg, plan.seq_len)


def is_done(stage: Stage) -> bool:
    stamp = stage.final / "demo_recipe.txt"
    return stamp.is_file() and stamp.read_text().strip() == stage.recipe_hash()


def _mark(stage: Stage) -> None:
    (stage.final / "demo_recipe.txt").write_text(stage.recipe_hash() + "\n")


def probe_step_seconds(plan: DemoPlan, device: str = "cpu", precision: str = "float32") -> float:
    """Seconds of one training step of the demo's dense model on this machine: one untimed
    warm-up step, then one timed step, on random tokens (nothing is saved)."""
    import torch

    from earlyexit.config import ModelConfig
    from earlyexit.models.decoder import Decoder
    from earlyexit.training.exit_losses import ExitTraining

    mc = ModelConfig(vocab_size=plan.vocab_size, **plan.model)
    mc = dataclasses.replace(
        mc, exits=dataclasses.replace(mc.exits, steps=exit_steps(plan.model["n_layers"]))
    )
    dev = torch.device(device)
    model = Decoder(mc).to(dev)
    model.init_weights(torch.Generator(device=dev).manual_seed(0))
    model.train()
    return _time_step(model, ExitTraining("shallow-deep"), plan.batch_size, plan.seq_len, precision)


def probe_user_exit_step(stage: Stage) -> float:
    """Seconds of one step of a user model's exit fine-tune (:func:`user_exit_stage`) on
    this machine, timed as the run will train: the model loaded from ``init_from`` with the
    run's exits, its objective, the body frozen (``train_only``), a warm-up step and one
    timed step on random tokens (nothing is saved). Scaling the demo's own 6M-parameter step
    by FLOPs instead misjudged SmolLM2's (14.8 min said, 9.6 taken)."""
    import torch

    from earlyexit.io.checkpoint import load_checkpoint
    from earlyexit.io.registry import resolve_model
    from earlyexit.training.losses import get_objective
    from earlyexit.training.model_setup import freeze_all_but, with_exits

    cfg = stage.cfg
    dev = torch.device(cfg.device if cfg.device != "auto" else "cpu")
    model, _ = load_checkpoint(resolve_model(cfg.init_from), dev)
    model = with_exits(model, cfg)
    model.train()
    objective = get_objective(cfg.objective, cfg)
    objective.setup(model)
    if cfg.train_only:
        freeze_all_but(model, cfg.train_only)
    precision = stage.precision or _resolved(cfg.precision, str(dev))
    return _time_step(model, objective, cfg.batch_size, cfg.seq_len, precision)


def _time_step(model, objective, batch_size: int, seq_len: int, precision: str) -> float:
    """One untimed warm-up step, then the seconds of one timed step (random tokens)."""
    import contextlib

    import torch

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(dev)
    autocast = (
        (lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
        if precision == "bfloat16"
        else contextlib.nullcontext
    )
    took = 0.0
    for i in range(2):
        t = time.perf_counter()
        with autocast():
            loss = objective(model, x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t if i == 1 else took
    return took


class Estimate:
    """Seconds the demo still needs, from a measured dense step and each stage's relative
    cost; :meth:`stage_done` rescales the remaining stages by how long the finished ones
    took against their prediction (cumulatively, so one noisy stage does not swing it)."""

    # each trained stage also loads models, probes the matmul peak, evaluates and saves
    STAGE_OVERHEAD_S = 3.0

    def __init__(self, plan: DemoPlan, step_s: float, measure_s: float | None = None) -> None:
        """``measure_s``: the measurements' seconds when timed directly (a user's model,
        ``user_model.measure_seconds``) rather than scaled from the dense step."""
        self.plan, self.step_s, self.measure_s = plan, step_s, measure_s
        self.predicted = self.actual = 0.0

    @property
    def scale(self) -> float:
        return self.actual / self.predicted if self.predicted > 0 else 1.0

    def _stage(self, st: Stage) -> float:
        cost = st.cost if st.cost is not None else self.plan.relative_cost.get(st.eta_key, 1.0)
        return self.STAGE_OVERHEAD_S + st.steps * cost * self.step_s

    def stage(self, st: Stage) -> float:
        return self._stage(st) * self.scale

    def data(self) -> float:
        return self.plan.relative_cost["prepare"] * self.step_s

    def measure(self) -> float:
        if self.measure_s is not None:
            return self.measure_s
        return self.plan.relative_cost["measure"] * self.step_s * self.scale

    def stage_done(self, st: Stage, seconds: float) -> None:
        """Count a trained stage's measured time against its prediction."""
        self.predicted += self._stage(st)
        self.actual += seconds


def build(
    stages_: list[Stage], progress: bool, log, estimate: Estimate | None = None
) -> tuple[dict[str, Path], dict[str, float], list[str]]:
    """Run (or reuse) every stage; returns (final paths, seconds per stage, reused names).
    With an ``estimate``, each stage announces its expected time and, once done, revises
    the estimate of the stages after it (logged)."""
    from earlyexit.training.loop import train

    paths, seconds, reused = {}, {}, []
    rebuilt: set[str] = set()
    for i, st in enumerate(stages_):
        stale_input = any(d in rebuilt for d in st.deps)
        if is_done(st) and not stale_input:
            reused.append(st.name)
            paths[st.name] = st.final
            continue
        t = time.perf_counter()
        expect = f" (expected ~{fmt_seconds(estimate.stage(st))})" if estimate and st.steps else ""
        log(f"[train {i + 1}/{len(stages_)}] {st.title} -> {st.final}{expect}")
        if st.convert is not None:
            _convert(st.convert)
        else:
            run = Path(st.cfg.out)
            if (run / "final").exists() and not (run / "latest").exists():
                shutil.rmtree(run / "final")  # a stale final without a run behind it
            digests = json.dumps([_weights_digest(p) for p in st.inputs])
            marker = run / "demo_inputs.json"  # the inputs a (possibly interrupted) run used
            changed = marker.is_file() and marker.read_text() != digests
            same = _same_recipe(run, st.cfg, st.precision)
            if run.exists() and (stale_input or changed or not same):
                shutil.rmtree(run)  # its recipe or its input changed: start that stage again
            run.mkdir(parents=True, exist_ok=True)
            marker.write_text(digests)
            train(st.cfg, resume=True, progress=progress, log=log)
        rebuilt.add(st.name)
        _mark(st)
        paths[st.name] = st.final
        seconds[st.name] = time.perf_counter() - t
        if estimate is not None and st.steps:
            estimate.stage_done(st, seconds[st.name])
            rest = [x for x in stages_[i + 1 :] if not is_done(x)]
            left = sum(estimate.stage(x) for x in rest) + estimate.measure()
            log(
                f"[train {i + 1}/{len(stages_)}] done in {fmt_seconds(seconds[st.name])}; "
                f"revised estimate for the rest of the demo: ~{fmt_seconds(left)}"
            )
    return paths, seconds, reused


def _same_recipe(run: Path, cfg, precision: str | None = None) -> bool:
    """Whether ``run`` was started with ``cfg`` (fields that change the result only).
    ``precision``: the precision ``cfg.precision`` resolves to here; compared with the one
    the run resolved (not with how it was asked for: ``auto`` and ``float32`` can be the
    same run)."""
    f = run / "train_config.json"
    if not f.is_file():
        return True  # nothing recorded yet: let the loop decide
    try:
        old = json.loads(f.read_text())
    except ValueError:
        return False
    new = dataclasses.asdict(cfg)
    ignore = RUNTIME_FIELDS | ({"flops_budget", "steps"} if cfg.flops_budget else set())
    if precision is not None:
        ignore = ignore | {"precision"}
        if old.get("precision_resolved", old.get("precision")) != precision:
            return False
    return all(
        json.dumps(old.get(k), default=str) == json.dumps(v, default=str)
        for k, v in new.items()
        if k not in ignore
    )


def _convert(c: dict) -> None:
    from earlyexit.config import LoraConfig
    from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
    from earlyexit.models.recursive import convert_recursive

    if not Path(c["src"]).is_dir():
        raise InputError(f"{c['src']}: the dense stage has no final checkpoint")
    dense, tok = load_checkpoint(c["src"], "cpu")
    r = c["lora_rank"]
    lora = LoraConfig(rank=r) if r > 0 else None
    model = convert_recursive(
        dense, c["loops"], c["scheme"], c["init"], lora=lora, lora_init=c["lora_init"]
    )
    # the dense exits carry over here; the uptraining stage drops them (exit_steps=()) and
    # the loop-exit stage adds the exit after the first loop
    dst = Path(c["dst"])
    if dst.exists():
        shutil.rmtree(dst)
    save_checkpoint(model, dst, tokenizer=tok)
