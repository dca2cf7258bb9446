"""Agreement with full depth: what a strategy changes in a model's greedy output.

    earlyexit eval agreement --model DIR --data DIR --strategy free --threshold 0.3

The same validation prompts are decoded greedily at full depth and with the strategy, one
at a time; quality is token match (position-wise) and ROUGE-L (on token ids) against the
full-depth output, next to the measured speedup (full time / strategy time in this run),
average depth and exit rate. The benchmark ``early-exit`` sweeps the same measurement.
"""

from __future__ import annotations

from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import make_strategy
from earlyexit.errors import InputError
from earlyexit.evaluation.metrics import agreement, timed_decode, validation_prompts


def agreement_eval(
    model_dir: str,
    data: str,
    strategy: str = "free",
    options: dict | None = None,
    n_prompts: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 64,
    device: str = "auto",
    dtype: str | None = None,
    draft="auto",
) -> dict:
    """Token match, ROUGE-L, speedup and depth of ``strategy`` against full depth
    (``draft``: as in :func:`earlyexit.load`)."""
    import earlyexit

    if n_prompts < 1 or prompt_len < 1 or new_tokens < 1:
        raise InputError("--prompts, --prompt-len and --new-tokens must be >= 1")
    lm = earlyexit.load(model_dir, device=device, dtype=dtype, draft=draft)
    model = lm.model
    try:
        prompts = validation_prompts(data, n_prompts, prompt_len)
    except ValueError as e:
        raise InputError(f"{data}: {e}") from None
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    options = options or {}
    make_strategy(model, strategy, **options)  # validate before any decoding

    def run(name: str, opts: dict):
        s = make_strategy(model, name, **opts)
        dt, res = timed_decode(model, prompts, params, s)
        return dt, res, s

    run("full", {})  # warm-up
    t_full, ref, _ = run("full", {})
    t_cfg, res, s = run(strategy, options)
    depths = [d for r in res for d in r.depths]
    L = model.n_steps
    return {
        "model": str(model_dir),
        "strategy": strategy,
        "options": options,
        "prompts": n_prompts,
        "new_tokens": new_tokens,
        **agreement([r.token_ids for r in res], [r.token_ids for r in ref]),
        "speedup": t_full / t_cfg,
        "seconds": t_cfg,
        "seconds_full": t_full,
        "mean_depth": sum(depths) / len(depths),
        "n_steps": L,
        "exit_rate": sum(d < L for d in depths) / len(depths),
        "stats": s.stats(),
    }
