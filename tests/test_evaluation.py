"""Evaluation: agreement with full depth, strategy-honouring scoring, the lm-eval adapter."""

import json
import warnings

import pytest
import torch

from earlyexit.cli import main
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.errors import InputError
from earlyexit.evaluation.scoring import score
from tests.conftest import make_model

warnings.filterwarnings("ignore", category=ExitWarning)


@pytest.fixture
def model():
    return make_model(n_layers=4, exits={"steps": [1, 2], "trained": True}, init_std=0.3)


def _forward_logprob(logits, ctx, cont):
    lp = logits[0, len(ctx) - 1 : len(ctx) + len(cont) - 1].float().log_softmax(-1)
    return float(lp.gather(1, torch.tensor(cont)[:, None]).sum())


def test_full_depth_score_equals_the_forward_pass(model):
    ctx, cont = [5, 9, 2, 7], [11, 3, 3]
    total, greedy, depths = score(model, make_strategy(model, "full"), ctx, cont)
    with torch.no_grad():
        ref = _forward_logprob(model(torch.tensor([ctx + cont])), ctx, cont)
    assert total == pytest.approx(ref, abs=1e-4)
    assert depths == [model.n_steps] * 3
    # the argmax continuation is greedy, another one is not
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    assert score(model, make_strategy(model, "full"), ctx, [nxt])[1]
    assert not score(model, make_strategy(model, "full"), ctx, [(nxt + 1) % 512])[1]
    assert isinstance(greedy, bool)


def test_forced_free_scoring_honours_the_strategy(model):
    ctx, cont = [5, 9, 2, 7], [11, 3, 3, 8]
    full = score(model, make_strategy(model, "full"), ctx, cont)[0]
    # never exiting: the strategy's teacher-forced logits are the full model's
    never = score(model, make_strategy(model, "free", threshold=1.0), ctx, cont)
    assert never[0] == pytest.approx(full, abs=1e-4) and set(never[2]) == {model.n_steps}
    # always exiting after step 1: the first token comes from the (full-depth) prefill, every
    # later one from exit 1, whose logits differ
    always = score(model, make_strategy(model, "free", exit_step=1, threshold=-1.0), ctx, cont)
    assert always[2] == [model.n_steps, 1, 1, 1]
    with torch.no_grad():
        out = model(torch.tensor([ctx + cont]), exits=True)
    exit1 = out.exit_logits[0]  # (1, T, V): the exit after step 1
    lp_first = _forward_logprob(out.exit_logits[-1], ctx, cont[:1])
    lp_rest = exit1[0, len(ctx) : len(ctx) + 3].float().log_softmax(-1)
    ref = lp_first + float(lp_rest.gather(1, torch.tensor(cont[1:])[:, None]).sum())
    assert always[0] == pytest.approx(ref, abs=1e-3)
    assert always[0] != pytest.approx(full, abs=1e-3)


def test_scoring_rejects_empty_and_oversized(model):
    s = make_strategy(model, "full")
    with pytest.raises(InputError):
        score(model, s, [], [1])
    with pytest.raises(InputError):
        score(model, s, [1] * 300, [1])


def test_eval_agreement_cli(exit_setup, capsys):
    d = exit_setup
    args = ["eval", "agreement", "--model", str(d / "model"), "--data", str(d / "data")]
    args += ["--prompts", "2", "--prompt-len", "8", "--new-tokens", "6", "--json"]
    assert main([*args, "--strategy", "free", "--threshold", "1.0"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["token_match"] == 1.0 and never["rouge_l"] == 1.0 and never["exit_rate"] == 0
    assert main([*args, "--strategy", "static", "--exit-step", "1"]) == 0
    static = json.loads(capsys.readouterr().out)
    # the first token comes from the full-depth prefill, the other five from exit 1
    assert static["mean_depth"] == pytest.approx((4 + 5 * 1) / 6) and static["speedup"] > 0
    assert main([*args[:4], "--strategy", "free"]) == 1  # no --data
    assert "needs --data" in capsys.readouterr().err
