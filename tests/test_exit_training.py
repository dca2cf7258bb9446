"""Exit-training objectives (free.md §7.10, recursive.md §7.11) and the exit classifier."""

import pytest
import torch

from earlyexit.errors import ConfigError
from earlyexit.training.exit_losses import (
    ExitClassifierTraining,
    ExitTraining,
    align_teachers,
    dynamic_kd,
    kd_teachers,
)
from earlyexit.training.losses import cross_entropy
from tests.conftest import make_model


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (2, 12), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_weighted_ce_uses_step_over_sum_of_steps(batch):
    model = make_model(n_layers=4, exits={"steps": [1, 3]})
    x, y = batch
    out = model(x, exits=True)
    ces = [cross_entropy(lg, y) for lg in out.exit_logits]
    expected = (1 * ces[0] + 3 * ces[1] + 4 * ces[2]) / 8
    got = ExitTraining("weighted")(model, x, y).loss
    torch.testing.assert_close(got, expected)


def test_aggressive_with_zero_coefficient_is_the_lm_loss(batch):
    model = make_model(n_layers=4, exits={"steps": [2]})
    x, y = batch
    got = ExitTraining("aggressive", exit_coef=0.0)(model, x, y).loss
    torch.testing.assert_close(got, cross_entropy(model(x), y))
    kd = ExitTraining("aggressive", exit_coef=0.1)(model, x, y)
    assert kd.loss > got and "kl@2" in kd.metrics


def test_shallow_deep_weights_and_kd(batch):
    model = make_model(n_layers=8, exits={"steps": [2]})
    x, y = batch
    obj = ExitTraining("shallow-deep", kd_alpha=0.0)
    obj.setup(model)
    assert model.config.exits.trained
    out = model(x, exits=True)
    ce_s, ce_d = cross_entropy(out.exit_logits[0], y), cross_entropy(out.exit_logits[1], y)
    torch.testing.assert_close(obj(model, x, y).loss, (2 * ce_s + 8 * ce_d) / 10)
    with_kd = ExitTraining("shallow-deep", kd_alpha=0.5)(model, x, y)
    torch.testing.assert_close(
        with_kd.loss, (2 * ce_s + 8 * ce_d) / 10 + 0.5 * with_kd.metrics["kd"]
    )


def test_kd_teachers_get_no_gradient():
    h = [torch.randn(2, 5, 16, requires_grad=True) for _ in range(8)]
    dynamic_kd(h, 2).backward()
    students, teachers = h[:2], kd_teachers(8, 2)
    assert teachers == (4, 8)
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    for t in teachers:
        if t > 2:
            assert h[t - 1].grad is None


def test_kd_alignment_is_monotone():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        n_t, n_s = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
        picks = align_teachers(torch.rand(n_t, n_s, generator=g))
        assert all(a <= b for a, b in zip(picks, picks[1:])), (
            picks
        )  # deeper teacher, deeper or equal student
        assert all(0 <= p < n_s for p in picks)
    # the first pick (deepest teacher) is the unconstrained best
    m = torch.tensor([[0.5, 0.1, 0.9], [0.4, 0.3, 0.2]])
    assert align_teachers(m) == [1, 2] and align_teachers(
        torch.tensor([[0.1, 0.9], [0.1, 0.9]])
    ) == [0, 0]


def test_known_teacher_tables():
    assert kd_teachers(24, 6) == (4, 8, 12, 16, 20, 24)
    assert kd_teachers(12, 3) == (4, 8, 12)
    assert kd_teachers(24, 10) == (3, 6, 8, 11, 13, 16, 18, 20, 22, 24)


def test_exit_objective_errors():
    with pytest.raises(ConfigError, match="needs exit points"):
        ExitTraining().setup(make_model())
    with pytest.raises(ConfigError, match="exactly one intermediate exit"):
        ExitTraining("shallow-deep").setup(make_model(exits={"steps": [1, 2]}))
    with pytest.raises(ConfigError, match="exit_loss must be"):
        ExitTraining("bogus")
    with pytest.raises(ConfigError, match="no exit classifiers"):
        ExitClassifierTraining().setup(make_model(exits={"steps": [2]}))


def test_exit_classifier_trains_only_the_classifiers(batch):
    model = make_model(n_layers=4, exits={"steps": [2], "classifier": True}).train()
    obj = ExitClassifierTraining()
    obj.setup(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("exit_classifiers.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch
    for _ in range(3):
        out = obj(model, x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("exit_classifiers."), n
    assert {"cls_loss@2", "cls_acc@2", "agree@2"} <= set(out.metrics)


def test_kd_alignment_follows_the_strict_rule():
    """free.md §1, written out: from the deepest teacher down, each takes the lowest-error
    student with an index *strictly* below the previous pick (the first is free; with none
    left it reuses the previous pick)."""

    def reference(mse):
        n_t, n_s = len(mse), len(mse[0])
        picks, prev = [None] * n_t, None
        for t in reversed(range(n_t)):
            allowed = range(n_s) if prev is None else range(prev)
            if len(allowed) == 0:
                picks[t] = prev
                continue
            picks[t] = prev = min(allowed, key=lambda s: mse[t][s])
        return picks

    # both teachers prefer student 1: strictly below forces the shallower one to student 0
    assert align_teachers(torch.tensor([[0.9, 0.1], [0.9, 0.1]])) == [0, 1]
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        n_t, n_s = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
        m = torch.rand(n_t, n_s, generator=g)
        assert align_teachers(m) == reference(m.tolist()), m
