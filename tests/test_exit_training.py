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
from earlyexit.training.losses import cross_entropy, get_objective
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
    from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
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


def _ce(logits, y):  # mean next-token cross-entropy written out
    logp = logits.double().log_softmax(-1)
    return -logp.gather(-1, y[..., None]).mean()


def _kl(teacher, student):  # mean over tokens of KL(teacher || student)
    pt, ls = teacher.double().softmax(-1), student.double().log_softmax(-1)
    return (pt * (pt.clamp_min(1e-300).log() - ls)).sum(-1).mean()


def test_aggressive_loss_with_several_exits_equals_the_formula(batch):
    """RRT §4: CE_final + c x sum over intermediate exits of (CE_i + KL(final || exit_i))."""
    model = make_model(n_layers=6, exits={"steps": [2, 4]})
    x, y = batch
    with torch.no_grad():
        out = model(x, exits=True)
        e2, e4, fin = out.exit_logits
        want = _ce(fin, y) + 0.3 * (_ce(e2, y) + _kl(fin, e2) + _ce(e4, y) + _kl(fin, e4))
        got = ExitTraining("aggressive", exit_coef=0.3)(model, x, y)
    assert float(got.loss) == pytest.approx(float(want), rel=1e-5)
    assert float(got.metrics["kl@4"]) == pytest.approx(float(_kl(fin, e4)), abs=1e-6)
    assert float(got.metrics["ce@2"]) == pytest.approx(float(_ce(e2, y)), rel=1e-5)
    d = ExitTraining()
    assert (d.exit_loss, d.coef, d.alpha) == ("shallow-deep", 0.1, 0.5)


def test_kl_to_is_forward_kl_per_token():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    from earlyexit.training.exit_losses import kl_to

    assert float(kl_to(t, s)) == pytest.approx(float(_kl(t, s)), rel=1e-5)


def test_dynamic_kd_equals_the_written_out_loss():
    """free.md §1: teachers = the fixed deep layers (1-based), students = layers 1..L_s,
    M = MSE, greedy strictly monotone alignment from the deepest teacher, mean of picks."""
    g = torch.Generator().manual_seed(4)
    normed = [torch.randn(2, 3, 8, generator=g) for _ in range(8)]
    teachers = kd_teachers(8, 3)  # (3, 5, 8)
    mse = [[float(((normed[t - 1] - normed[s]) ** 2).mean()) for s in range(3)] for t in teachers]
    picks, prev = [None] * 3, None
    for t in reversed(range(3)):
        allowed = range(3) if prev is None else range(prev)
        picks[t] = prev if not allowed else min(allowed, key=lambda s: mse[t][s])
        prev = picks[t]
    want = sum(mse[t][picks[t]] for t in range(3)) / 3
    assert float(dynamic_kd(normed, 3)) == pytest.approx(want, rel=1e-5)


class _Stub(torch.nn.Module):
    """A model whose exit and classifier logits are given: the objective's arithmetic alone."""

    def __init__(self, exit_logits, cls_logits, points):
        super().__init__()
        from types import SimpleNamespace

        self.out = SimpleNamespace(exit_logits=exit_logits, classifier_logits=cls_logits)
        self.config = SimpleNamespace(exit_points=points)
        self.exit_classifiers = torch.nn.ModuleList([torch.nn.Linear(1, 1)])

    def forward(self, inputs, exits=False):
        return self.out


def test_exit_classifier_loss_equals_the_written_out_one():
    """CALM's classifier loss per intermediate exit: label = (exit argmax == final argmax),
    classes weighted by the other class's share (clamped to [1e-3, 1 - 1e-3]), mean over
    exits; accuracy and agreement reported per exit. Also through a DDP-style wrapper."""
    g = torch.Generator().manual_seed(5)
    fin = torch.randn(2, 6, 9, generator=g)
    same = fin.clone()  # exit 1 agrees everywhere: p_agree clamps to 0.999
    other = torch.randn(2, 6, 9, generator=g)  # agrees at some positions only
    flipped = fin.clone()
    flipped.scatter_(-1, fin.argmax(-1, keepdim=True), -1e4)  # never agrees: clamps to 1e-3
    exits = [same, other, flipped, fin]
    cls = [torch.randn(2, 6, 2, generator=g) for _ in range(3)]
    stub = _Stub(exits, cls, (1, 2, 3, 4))
    out = ExitClassifierTraining()(stub, None, None)
    losses = []
    for i, (lg, c) in enumerate(zip(exits[:3], cls)):
        label = (lg.argmax(-1) == fin.argmax(-1)).long().flatten()
        p = min(max(float(label.float().mean()), 1e-3), 1 - 1e-3)
        w = torch.tensor([p, 1 - p], dtype=torch.double)[label]
        nll = -c.double().log_softmax(-1).flatten(0, 1).gather(-1, label[:, None])[:, 0]
        losses.append(float((w * nll).sum() / w.sum()))
        acc = float((c.argmax(-1).flatten() == label).float().mean())
        assert float(out.metrics[f"cls_acc@{i + 1}"]) == pytest.approx(acc)
        assert float(out.metrics[f"agree@{i + 1}"]) == pytest.approx(p)
        assert float(out.metrics[f"cls_loss@{i + 1}"]) == pytest.approx(losses[-1], rel=1e-5)
    assert float(out.loss) == pytest.approx(sum(losses) / 3, rel=1e-5)

    class DDP(torch.nn.Module):  # a wrapper that keeps the model in .module
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *a, **k):
            return self.module(*a, **k)

    torch.testing.assert_close(ExitClassifierTraining()(DDP(stub), None, None).loss, out.loss)


def test_exit_objective_error_lines():
    with pytest.raises(ConfigError) as e:
        ExitTraining("bogus")
    assert str(e.value) == (
        "exit_loss must be one of weighted, aggressive, shallow-deep, got 'bogus'"
    )
    with pytest.raises(ConfigError) as e:
        ExitTraining().setup(make_model())
    assert str(e.value) == (
        "--objective exits needs exit points: pass --exit-steps (e.g. --exit-steps 2)"
    )
    with pytest.raises(ConfigError) as e:
        ExitClassifierTraining().setup(torch.nn.Linear(2, 2))  # no exit_classifiers at all
    assert str(e.value) == "the model has no exit classifiers (train with --exit-classifier)"


# ---------------------------------------------------------------------- training/losses.py
def test_lm_and_uptraining_objectives_equal_their_formulas(batch, tmp_path):
    """LM: next-token CE at full depth. Uptraining (RRT §3): CE + w x KL(teacher || student)
    with the teacher's logits computed online and detached. Validation NLL: summed token
    NLL over the batches / tokens."""
    from types import SimpleNamespace

    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.training.losses import LanguageModeling, Uptraining, evaluate_nll

    x, y = batch
    student = make_model(n_layers=4, seed=1)
    teacher = make_model(n_layers=4, seed=2)
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
    out = LanguageModeling()(student, x, y)
    assert float(out.loss.detach()) == pytest.approx(float(_ce(s_logits, y)), rel=1e-5)
    assert float(out.metrics["ce"]) == pytest.approx(float(_ce(s_logits, y)), rel=1e-5)
    up = Uptraining(str(save_checkpoint(teacher, tmp_path / "teacher")), weight=0.7)
    up.setup(student)
    assert not any(p.requires_grad for p in up.teacher.parameters())
    got = up(student, x, y)
    want = _ce(s_logits, y) + 0.7 * _kl(t_logits, s_logits)
    assert float(got.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(got.metrics["kl"]) == pytest.approx(float(_kl(t_logits, s_logits)), abs=1e-6)
    assert float(got.metrics["ce"]) == pytest.approx(float(_ce(s_logits, y)), rel=1e-5)
    got.loss.backward()  # the gradient reaches the student only
    assert student.blocks[0].mlp.w2.weight.grad is not None
    nll, count = evaluate_nll(student, [(x, y), (x[:1], y[:1])])
    logp = s_logits.double().log_softmax(-1).gather(-1, y[..., None])[..., 0]
    want_nll = -(logp.sum() + logp[:1].sum()) / (y.numel() + y[:1].numel())
    assert count == y.numel() + y[:1].numel() and nll == pytest.approx(float(want_nll), rel=1e-5)
    # options reach the objectives
    cfg = SimpleNamespace(exit_loss="weighted", exit_coef=0.2, kd_alpha=0.3, teacher=None)
    ex = get_objective("exits", cfg)
    assert (ex.exit_loss, ex.coef, ex.alpha) == ("weighted", 0.2, 0.3)
    assert isinstance(get_objective("lm"), LanguageModeling)
    assert isinstance(get_objective("exit-classifier"), ExitClassifierTraining)
    cfg2 = SimpleNamespace(teacher="t-dir", distill_weight=0.25)
    u = get_objective("uptrain", cfg2)
    assert (u.teacher_dir, u.weight) == ("t-dir", 0.25)


def test_objective_errors_are_one_clear_line(tmp_path):
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.training.losses import Uptraining

    cases = [
        (
            lambda: get_objective("bogus"),
            "unknown objective 'bogus'; available: lm, exits, exit-classifier, uptrain",
        ),
        (
            lambda: Uptraining(None),
            "--objective uptrain needs --teacher DIR (the dense source model)",
        ),
        (lambda: Uptraining("t", weight=-1.0), "distill weight must be >= 0, got -1.0"),
    ]
    teacher = save_checkpoint(make_model(vocab_size=300), tmp_path / "t300")
    cases.append(
        (
            lambda: Uptraining(str(teacher)).setup(make_model()),
            f"{teacher}: the teacher's vocabulary differs from the student's",
        )
    )
    for make, msg in cases:
        with pytest.raises(ConfigError) as e:
            make()
        assert str(e.value) == msg


def test_objective_defaults_and_wrapped_mor_models():
    """get_objective's defaults for a config without uptraining options; the LM objective
    of a MoR model inside a DDP-style wrapper still routes top-k and adds the router loss."""
    from types import SimpleNamespace

    from earlyexit.training.losses import LanguageModeling, Uptraining

    u = get_objective("uptrain", SimpleNamespace(teacher="t"))
    assert (u.teacher_dir, u.weight) == ("t", 1.0) and Uptraining("t").weight == 1.0
    assert Uptraining("t", 0.0).weight == 0.0  # zero is allowed: LM loss only
    with pytest.raises(ConfigError, match="needs --teacher"):
        get_objective("uptrain", SimpleNamespace())
    m = make_model(
        n_layers=8, sharing={"scheme": "middle_cycle", "loops": 3}, router={"kind": "expert"}
    )

    class DDP(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *a, **k):
            return self.module(*a, **k)

    x = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    out = LanguageModeling()(DDP(m), x, y)
    with torch.no_grad():
        ref = m(x, routing="train", return_routing=True)
    assert float(out.metrics["router_loss"]) == pytest.approx(float(ref.aux_loss), rel=1e-5)
    want = _ce(ref.logits, y) + ref.aux_loss
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert "router_accuracy@2" in out.metrics
