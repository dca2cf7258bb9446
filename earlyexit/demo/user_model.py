"""The models the demo measures that it did not train: ``demo --model DIR`` (a checkpoint,
a Hugging Face directory or hub name, a GGUF file or a named model) made into our checkpoint
format, its tokenizer and exits inspected; and the parity check of a dense model against
``transformers`` on the same weights."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from earlyexit.errors import InputError


def check_model_arg(model: str) -> None:
    """Refuse ``demo --model`` values that cannot be a model, before anything is written:
    not a named model, not an existing path, and not shaped like a hub name (``org/name``).
    A near miss of a named model is suggested (``smollm`` -> ``smollm2``)."""
    from earlyexit.io.registry import NAMED, suggest_named

    p = Path(model).expanduser()
    if (model in NAMED and not p.exists()) or p.is_dir():
        return
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        hint = suggest_named(model)
        raise InputError(
            f"{model}: not a model directory (and not a named model like "
            f"{', '.join(NAMED)} or a hub name like org/name)"
            + (f"; did you mean {hint}?" if hint else "")
        )


def user_checkpoint(model: str, work: Path) -> Path:
    """A named model (``smollm2``), a local directory (ours or Hugging Face's, which is
    converted once into ``work``), or a hub name downloaded with huggingface_hub (online)."""
    from earlyexit.io.registry import NAMED, resolve_model

    p = Path(model).expanduser()
    if model in NAMED and not p.exists():
        return resolve_model(model)
    if p.is_dir():
        return as_checkpoint(p, work)
    check_model_arg(model)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"{model}: downloading from the hub needs `pip install 'earlyexit[hf]'`"
        ) from None
    try:
        got = snapshot_download(
            model, allow_patterns=["*.json", "*.jinja", "*.safetensors", "tokenizer*"]
        )
    except Exception as e:  # offline, unknown repo, gated...
        raise InputError(
            f"{model}: could not download from the Hugging Face hub ({type(e).__name__}: {e})"
        ) from None
    return as_checkpoint(Path(got), work)


def as_checkpoint(model_dir: Path, work: Path) -> Path:
    """``model_dir`` in our checkpoint format (a Hugging Face directory is converted into
    ``work/user-model`` once; fine-tuning and the stage stamps read our format)."""
    from earlyexit.api import _is_hf_dir

    if not _is_hf_dir(model_dir):
        return model_dir
    from earlyexit.io.hf import hf_import

    dst = work / "user-model"
    marker = dst / "source.txt"
    if not (marker.is_file() and marker.read_text() == str(model_dir.resolve())):
        hf_import(model_dir, dst)
        marker.write_text(str(model_dir.resolve()))
    return dst


def draft_tokens(lm, data: Path):
    """A large vocabulary's most frequent 8k tokens in the corpus (FR-Spec drafting); None
    for vocabularies small enough that the full head is cheap."""
    if lm.config.vocab_size <= 16384:
        return None
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.training.data import token_file

    return frequent_tokens(token_file(data, "train"), 8192, lm.config.vocab_size)


def has_trained_exits(model_dir: Path) -> bool:
    from earlyexit.io.checkpoint import load_config

    exits = load_config(model_dir).exits
    return bool(exits.steps) and exits.trained


def user_tokenizer(model_dir: Path) -> str:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            f"{model_dir}: the demo needs the model's tokenizer.json to tokenize the corpus"
        )
    return str(path)


def check_parity(path: Path, hf_dir: Path) -> dict:
    """Export the model at ``path`` to ``hf_dir``, reload it with transformers, compare logits
    and greedy tokens (on the CPU in fp32, whatever the demo's device: a parity check)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'earlyexit[hf]')"}
    import earlyexit

    lm = earlyexit.load(path, device="cpu", dtype="float32")
    if lm.config.sharing.scheme != "none" or lm.config.exits.norms or lm.config.exits.classifier:
        return {"skipped": "the model does not export as a plain Llama"}
    transformers.utils.logging.disable_progress_bar()
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.io.hf import hf_export

    hf_export(lm.model, hf_dir, lm.tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([lm.encode("def main(argv):\n    ")])
    with torch.inference_mode():
        diff = (hf(ids).logits - lm.model(ids)).abs().max().item()
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[
            0, ids.shape[1] :
        ].tolist()
    ours = generate(
        lm.model, [ids[0].tolist()], SamplingParams(max_new_tokens=16, ignore_eos=True)
    )[0].token_ids
    return {"max_logit_diff": diff, "greedy_tokens_identical": theirs == ours}


def model_exit_step(model_dir: Path, up) -> int:
    """The exit the demo measures a user's model at: its own first trained exit, or where
    the demo's exit fine-tune (``UserExitPlan`` ``up``) will put one."""
    from earlyexit.demo.plans import user_exit_step
    from earlyexit.io.checkpoint import load_config

    cfg = load_config(model_dir)
    if cfg.exits.steps and cfg.exits.trained:
        return cfg.exits.steps[0]
    return user_exit_step(cfg.n_layers, up)


def measure_tokens(plan, config, exit_step: int) -> tuple[int, int]:
    """(tokens decoded at batch 1, row-tokens served by the engine) in the demo's
    measurements of a model with ``config`` once its exit after ``exit_step`` is trained:
    every strategy's interleaved rounds, and every engine job's rounds."""
    import dataclasses
    from types import SimpleNamespace

    from earlyexit.demo.evaluate import dense_configs, engine_jobs

    exits = dataclasses.replace(config.exits, steps=(exit_step,), trained=True)
    cfg = dataclasses.replace(config, exits=exits)
    shim = SimpleNamespace(config=cfg, n_steps=cfg.n_layers)
    n_cfg = len(dense_configs(shim, draft_tokens=[0] if cfg.vocab_size > 16384 else None))
    decodes = ((n_cfg + 1) * plan.rounds + 1) * plan.prompts * plan.new_tokens
    served = len(engine_jobs({"user": shim})) * plan.rounds * plan.requests * plan.mean_len
    return decodes, served


def measure_seconds(plan, model_dir: Path, exit_step: int, device: str = "cpu") -> float:
    """Seconds the demo's measurements of a user's model should take, from decode speed
    timed here: the model's full-depth seconds per token at batch 1 (the batch-1 strategy
    rounds) and per row-token at the plan's max batch (the engine runs), times the tokens
    each part decodes (:func:`measure_tokens`). The demo's own models are estimated from a
    training step instead, which misjudges a model 20x their size (it did: ~11 s said,
    ~60 s taken)."""
    import earlyexit
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams

    lm = earlyexit.load(model_dir, device=device)

    def per_token(batch: int, n: int = 6) -> float:
        prompts = [[(7 * i + j) % lm.config.vocab_size for j in range(16)] for i in range(batch)]
        generate(lm.model, prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm
        t = time.perf_counter()
        generate(lm.model, prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
        return (time.perf_counter() - t) / (n * batch)

    decodes, served = measure_tokens(plan, lm.config, exit_step)
    return decodes * per_token(1) + served * per_token(plan.max_batch)
