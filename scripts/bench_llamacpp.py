"""Our full-depth decode against llama.cpp at the same precision, on the same weights.

    pip install llama-cpp-python            # builds llama.cpp from source (~10 min on 2 cores)
    python scripts/bench_llamacpp.py [--precisions f32 bf16] [--new-tokens 64] [--repeats 3]

SmolLM2-135M-Instruct as shipped (Q4_1 GGUF): llama.cpp re-quantizes it to F32 and BF16
(``llama_model_quantize``: the Q4_1 weights dequantized, the values we load too), and both
decode greedily at batch 1 from the same prompt, ``--new-tokens`` tokens each, interleaved
repetitions, median, same thread count. Ours runs ``generate`` (the chosen kernels, our
KV cache) from ``earlyexit.load("smollm2", dtype=...)``. llama.cpp's own timer (eval time per
token, prompt excluded) is reported beside the wall clock of the same loop. Prints a table
and writes JSON rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

FTYPES = {"f32": 0, "bf16": 32}  # llama_ftype: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_BF16
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def requantize(src: Path, dst: Path, ftype: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize -> {rc}")
    return dst


def llama_decode(llm, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Greedy ``n`` tokens after ``prompt``: (tokens, wall seconds of the decode loop,
    llama.cpp's own eval seconds for those tokens)."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    perf0 = llama_cpp.llama_perf_context(llm.ctx)
    t = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    wall = time.perf_counter() - t
    perf1 = llama_cpp.llama_perf_context(llm.ctx)
    return out, wall, (perf1.t_eval_ms - perf0.t_eval_ms) / 1e3


def ours_decode(lm, prompt: list[int], n: int) -> tuple[list[int], float]:
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams

    t = time.perf_counter()
    res = generate(lm.model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
    return res[0].token_ids, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["f32", "bf16"], choices=list(FTYPES))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="results/llamacpp.json")
    a = ap.parse_args()

    import llama_cpp
    import torch

    import earlyexit
    from earlyexit.bench.common import cpu_name
    from earlyexit.io.registry import source_file
    from earlyexit.models import kernels

    torch.set_num_threads(a.threads)
    src = source_file("smollm2")  # the shipped GGUF itself
    text = "The quick brown fox jumps over the lazy dog. In Python, a list comprehension"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prec in a.precisions:
            gguf = requantize(src, Path(tmp) / f"smollm2-{prec}.gguf", FTYPES[prec])
            llm = llama_cpp.Llama(
                str(gguf), n_ctx=512, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=64, logits_all=True, verbose=False,
            )  # fmt: skip
            lm = earlyexit.load("smollm2", device="cpu", dtype=DTYPES[prec], draft=None)
            prompt = lm.tokenizer.encode(text)
            llama_decode(llm, prompt, 4), ours_decode(lm, prompt, 4)  # warm up both
            t_llama, t_eval, t_ours = [], [], []
            for r in range(a.repeats):
                for side in ("llama", "ours") if r % 2 == 0 else ("ours", "llama"):
                    if side == "llama":
                        toks_llama, wall, ev = llama_decode(llm, prompt, a.new_tokens)
                        t_llama.append(wall)
                        t_eval.append(ev)
                    else:
                        toks_ours, wall = ours_decode(lm, prompt, a.new_tokens)
                        t_ours.append(wall)
            same = sum(x == y for x, y in zip(toks_llama, toks_ours))
            first_diff = next(
                (i for i, (x, y) in enumerate(zip(toks_llama, toks_ours)) if x != y), None
            )
            row = {
                "precision": prec,
                "new_tokens": a.new_tokens,
                "threads": a.threads,
                "cpu": cpu_name(),
                "torch": torch.__version__,
                "llama_cpp_python": llama_cpp.__version__,
                "linear_kernels": kernels.status(),
                "llama_tok_s": a.new_tokens / statistics.median(t_llama),
                "llama_eval_tok_s": a.new_tokens / statistics.median(t_eval),
                "ours_tok_s": a.new_tokens / statistics.median(t_ours),
                "same_tokens": same,
                "first_difference": first_diff,
                "seconds": {"llama": t_llama, "llama_eval": t_eval, "ours": t_ours},
            }
            row["ours_vs_llama"] = row["ours_tok_s"] / row["llama_tok_s"]
            rows.append(row)
            del llm
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{rows[0]['cpu']}, {a.threads} threads, batch 1, {a.new_tokens} new tokens")
    print(
        "| precision | earlyexit tok/s | llama.cpp tok/s (its eval timer) | ours / llama.cpp | same greedy tokens |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['ours_tok_s']:.1f} | {r['llama_tok_s']:.1f} ({r['llama_eval_tok_s']:.1f}) "
            f"| {r['ours_vs_llama']:.2f}x | {r['same_tokens']}/{r['new_tokens']} |"
        )
    print(f"linear kernels: {rows[-1]['linear_kernels']}; rows written to {a.out}")


if __name__ == "__main__":
    main()
