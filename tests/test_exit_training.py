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


def test_exit_adapter_is_a_residual_mlp_before_the_exit_norm():
    """Reference written out: logits = head(norm(h + U silu(D h))) at the exit, and the
    full depth is untouched; a zero-initialised U leaves the exit as it was."""
    model = make_model(n_layers=4, exits={"steps": [2], "adapter_rank": 3})
    x = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = make_model(n_layers=4, exits={"steps": [2]})
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        h = model(x, exits=True).hidden[1]
        assert torch.equal(model.exit_logits(h, 2), plain.exit_logits(h, 2))  # U = 0
        a = model.exit_adapters[0]
        a.up.weight.normal_(0, 0.1)
        ref = h + torch.nn.functional.silu(h @ a.down.weight.T) @ a.up.weight.T
        want = model.norm(ref) @ model.head_weight().T
        torch.testing.assert_close(model.exit_logits(h, 2), want)
        torch.testing.assert_close(model(x), plain(x))  # the full depth does not see it


def test_train_only_the_exit_keeps_the_full_model_bit_for_bit(tmp_path):
    """--train-only exit_ with an adapter: the exit learns, every shared weight stays."""
    from earlyexit.checkpoint import load_checkpoint, save_checkpoint
    from earlyexit.training.loop import TrainConfig, train
    from tests.test_training import TINY_MODEL, make_setup

    (tmp_path / "s").mkdir()
    setup = make_setup(tmp_path / "s")
    src = make_model(**{k: v for k, v in TINY_MODEL.items() if k != "name"}, init_std=0.3)
    save_checkpoint(src, tmp_path / "src")
    common = dict(
        data=str(setup / "data"),
        init_from=str(tmp_path / "src"),
        objective="exits",
        exit_steps=(1,),
        exit_loss="aggressive",
        exit_adapter_rank=4,
        train_only=("exit_",),
        seq_len=16,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        save_every=2,
        device="cpu",
    )
    full = train(
        TrainConfig(**common, out=str(tmp_path / "r"), steps=4), progress=False, log=lambda *a: None
    )
    tuned, _ = load_checkpoint(full["final"])
    for name, p in src.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], p), name
    assert tuned.exit_adapters[0].up.weight.abs().sum() > 0  # the adapter learned
    # stopped after 2 steps and resumed: the same weights as the uninterrupted run
    cut = TrainConfig(**common, out=str(tmp_path / "c"), steps=4, stop_at_step=2)
    train(cut, progress=False, log=lambda *a: None)
    done = train(
        TrainConfig(**common, out=str(tmp_path / "c"), steps=4),
        resume=True,
        progress=False,
        log=lambda *a: None,
    )
    again, _ = load_checkpoint(done["final"])
    for name, p in tuned.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], p, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="matches no parameter"):
        train(
            TrainConfig(**{**common, "train_only": ("nope_",)}, out=str(tmp_path / "n"), steps=1),
            progress=False,
            log=lambda *a: None,
        )
