"""``earlyexit demo``: the main job, end to end on this machine with no downloads.

What it shows today (the trained, multi-technique demo is built on top of this as the
training, exit, recursion and MoR parts land):

1. builds a tiny Llama-shaped model (random weights, byte-level tokenizer) and saves it in
   the earlyexit checkpoint format;
2. exports it to a Hugging Face directory, loads that with ``transformers`` and checks
   that logits and greedy tokens match ours (skipped when ``transformers`` is absent);
3. converts the export back with ``hf-import`` and generates from it, printing each
   token with its depth (plan steps run; all of them for the full-depth strategy).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from earlyexit.checkpoint import save_checkpoint
from earlyexit.config import ModelConfig
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import EOT, byte_level_tokenizer

PROMPT = "def main("


def default_home() -> Path:
    return Path(os.environ.get("EARLYEXIT_HOME", "~/.cache/earlyexit")).expanduser()


def build_tiny(out: Path, seed: int = 0) -> Path:
    """A random tiny checkpoint with a byte-level tokenizer at ``out``."""
    tok = byte_level_tokenizer()
    cfg = ModelConfig.from_name(
        "tiny", name="demo-tiny", vocab_size=tok.vocab_size, eos_token_ids=[tok.token_to_id(EOT)]
    )
    torch.manual_seed(seed)
    model = Decoder(cfg)
    model.init_weights()
    return save_checkpoint(model, out, tokenizer=tok)


def _parity(ckpt: Path, hf_dir: Path) -> dict:
    """Export ``ckpt`` to ``hf_dir``, reload it in transformers, compare with ours."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'earlyexit[hf]')"}
    transformers.utils.logging.disable_progress_bar()
    from earlyexit.checkpoint import load_checkpoint
    from earlyexit.models.hf import hf_export

    model, tok = load_checkpoint(ckpt)
    hf_export(model, hf_dir, tok)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.inference_mode():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
        hf_out = hf.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[
            0, ids.shape[1] :
        ].tolist()
    from earlyexit.decoding.generate import generate

    ours = generate(model, [ids[0].tolist()], SamplingParams(max_new_tokens=16, ignore_eos=True))[
        0
    ].token_ids
    return {"max_logit_diff": diff, "greedy_tokens_identical": hf_out == ours}


def main(out_dir: str | None = None, quick: bool = False, as_json: bool = False) -> int:
    import earlyexit
    from earlyexit.models.hf import hf_import

    work = Path(out_dir).expanduser() if out_dir else default_home() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, file=sys.stderr))
    t0 = time.perf_counter()
    say(f"earlyexit demo  (work directory: {work})")
    say(
        "note: the trained early-exit / recursive / MoR demo is built as those parts land; this one"
    )
    say("      runs the model core end to end on an untrained tiny model, so its text is noise.\n")

    ckpt = build_tiny(work / "tiny")
    say(f"[1/3] built a random tiny model -> {ckpt}")
    parity = _parity(ckpt, work / "tiny-hf")
    if "skipped" in parity:
        say(f"[2/3] parity with transformers: skipped ({parity['skipped']})")
    else:
        ok = parity["greedy_tokens_identical"] and parity["max_logit_diff"] < 1e-4
        say(
            f"[2/3] exported to {work / 'tiny-hf'}; transformers vs earlyexit: max |logit diff| "
            f"{parity['max_logit_diff']:.2e}, greedy tokens identical: {parity['greedy_tokens_identical']}"
            f"  {'OK' if ok else 'MISMATCH'}"
        )
    src = work / "tiny-hf" if "skipped" not in parity else ckpt
    reimported = hf_import(src, work / "tiny-reimported") if src != ckpt else ckpt
    lm = earlyexit.load(reimported, device="cpu")
    n = 16 if quick else 48
    t1 = time.perf_counter()
    res = lm.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    dt = time.perf_counter() - t1
    say(
        f"[3/3] generated {len(res.token_ids)} tokens from {reimported} at {len(res.token_ids) / dt:.0f} tok/s"
    )
    say(f"      prompt {PROMPT!r} -> {res.text!r}")
    say(f"      depth per token (steps run of {lm.model.n_steps}): {res.depths}")
    say(
        f"\ndone in {time.perf_counter() - t0:.1f}s. Try:\n"
        f'  earlyexit generate --model {reimported} --json "def main("\n'
        f"  earlyexit bench decode --batch-sizes 1 --new-tokens 32"
    )
    if as_json:
        print(
            json.dumps({"checkpoint": str(reimported), "parity": parity, "result": res.to_dict()})
        )
    if "skipped" not in parity and not parity["greedy_tokens_identical"]:
        return 1
    return 0
