import copy
import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from lissa_influence.experiments import training
from lissa_influence.experiments.data import DataConfig, TwoStageData, load_two_stage
from lissa_influence.experiments.models import (
    ModelConfig,
    build_model,
    embedding_names,
    embedding_state,
    finetune_model_from,
)
from lissa_influence.experiments.training import (
    TrainConfig,
    finetune,
    finetune_objective,
    leave_out,
    pretrain,
    pretrain_objective,
    proximity,
    settings_key,
    train_two_stage,
)


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: extra intra-op threads only add overhead (and contention).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shrink(ds: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in ds.tensors))


@pytest.fixture(scope="module")
def small() -> TwoStageData:
    """Digits with 120 pretraining and 120 finetuning examples: fast full-batch runs."""
    d = load_two_stage(DataConfig(finetune_subsample=120))
    return dataclasses.replace(d, pretrain_train=shrink(d.pretrain_train, 120))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def grad_norm(loss, params) -> float:
    grads = torch.autograd.grad(loss, params)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


FAST = TrainConfig(steps=30, lr=1e-2, seed=0)


@pytest.fixture(scope="module")
def pretrained(small):
    return pretrain(build_model("digits", 4, seed=0), small, FAST)[0]


def test_pretrain_loss_goes_down_and_input_is_untouched(small):
    model = build_model("digits", 4, seed=0)
    before = params_of(model)
    x, y = small.pretrain_train.tensors
    start = value(pretrain_objective(model, x, y))
    trained, report = pretrain(model, small, FAST)
    assert report.loss < 0.5 * start
    assert abs(report.loss - value(pretrain_objective(trained, x, y))) < 1e-5
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # reported gradient norm is the full-batch gradient of G
    assert report.grad_norm == pytest.approx(
        grad_norm(pretrain_objective(trained, x, y), list(trained.parameters())), rel=1e-4
    )
    assert report.examples == len(y) and report.steps == FAST.steps
    assert all(p.grad is None for p in trained.parameters())


def test_minibatch_loss_goes_down(small):
    model = build_model("digits", 4, seed=0)
    x, y = small.pretrain_train.tensors
    start = value(pretrain_objective(model, x, y))
    _, report = pretrain(model, small, dataclasses.replace(FAST, batch_size=32, steps=40))
    assert report.loss < 0.5 * start


def test_same_seed_bitwise_same_weights(small):
    cfg = dataclasses.replace(FAST, batch_size=32, steps=20)
    a, _ = pretrain(build_model("digits", 4, seed=0), small, cfg)
    torch.manual_seed(999)  # the global RNG must not matter
    b, _ = pretrain(build_model("digits", 4, seed=0), small, cfg)
    c, _ = pretrain(build_model("digits", 4, seed=0), small, dataclasses.replace(cfg, seed=1))
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_dropping_an_example_changes_the_result(small):
    model = build_model("digits", 4, seed=0)
    m = len(small.pretrain_train)
    full, _ = pretrain(model, small, FAST)
    ones, _ = pretrain(model, small, FAST, weights=torch.ones(m))
    dropped, _ = pretrain(model, small, FAST, weights=leave_out(m, 5))
    assert same_weights(full, ones)  # unit weights are exactly the unweighted objective
    assert not same_weights(full, dropped)
    # the dropped example really is out of the objective
    x, y = small.pretrain_train.tensors
    keep = torch.arange(m) != 5
    w_obj = pretrain_objective(dropped, x, y, leave_out(m, 5))
    assert value(w_obj) == pytest.approx(value(pretrain_objective(dropped, x[keep], y[keep])) * (m - 1) / m, rel=1e-5)
    with pytest.raises(ValueError, match="one entry per pretraining example"):
        pretrain(model, small, FAST, weights=torch.ones(m + 1))


def test_resume_from_trained_weights(small, pretrained):
    _, r0 = pretrain(build_model("digits", 4, seed=0), small, dataclasses.replace(FAST, steps=0))
    resumed, r1 = pretrain(pretrained, small, FAST)
    assert r1.loss < value(pretrain_objective(pretrained, *small.pretrain_train.tensors)) < r0.loss
    # init= loads weights into a copy of the given architecture
    via_init, r2 = pretrain(build_model("digits", 4, seed=3), small, FAST, init=pretrained.state_dict())
    assert same_weights(resumed, via_init)


def test_fixed_mode_keeps_embedding_bit_identical(small, pretrained):
    ft = finetune_model_from(pretrained, 6, seed=0)
    x, y = small.finetune_train.tensors
    start = value(finetune_objective(ft, x, y, "fixed", 0.0, None))
    trained, report = finetune(ft, small, FAST, "fixed", w_star=embedding_state(pretrained))
    for name in embedding_names(trained):
        assert torch.equal(trained.get_parameter(name), pretrained.get_parameter(name))
    assert not torch.equal(trained.head[0].weight, ft.head[0].weight)
    assert report.loss < 0.5 * start
    # grad norm is over Theta only
    assert report.grad_norm == pytest.approx(
        grad_norm(finetune_objective(trained, x, y, "fixed", 0.0, None), list(trained.head.parameters())), rel=1e-4
    )


def test_fixed_mode_resets_embedding_to_new_w_star(small, pretrained):
    # Leave-one-out: old finetuned head, new pretrained embedding.
    ft, _ = finetune(finetune_model_from(pretrained, 6, seed=0), small, FAST, "fixed")
    new_w = {n: w + 0.01 for n, w in embedding_state(pretrained).items()}
    resumed, _ = finetune(ft, small, FAST, "fixed", w_star=new_w)
    assert all(torch.equal(resumed.get_parameter(n), w) for n, w in new_w.items())


def test_updated_mode_proximity_pulls_towards_w_star(small, pretrained):
    ft = finetune_model_from(pretrained, 6, seed=0)
    w_star = embedding_state(pretrained)
    cfg = dataclasses.replace(FAST, steps=40)
    loose, _ = finetune(ft, small, cfg, "updated", alpha=0.0, w_star=w_star)
    tight, _ = finetune(ft, small, cfg, "updated", alpha=10.0, w_star=w_star)
    assert value(proximity(tight, w_star)) < 0.5 * value(proximity(loose, w_star))
    assert value(proximity(loose, w_star)) > 0  # the embedding does train in this mode


def soft_label_data(d: TwoStageData, images: int = 40) -> TwoStageData:
    """Each image once with every label plus once more with its own: the optimum predicts
    2/7 vs 1/7, so CE has a finite minimiser (unlike separable data, where the loss only
    reaches zero as the weights run off to infinity and every gradient vanishes)."""
    x, y = (t[:images] for t in d.finetune_train.tensors)
    order = torch.arange(images).repeat(6)
    inputs = torch.cat([x[order], x])
    labels = torch.cat([torch.arange(6).repeat_interleave(images), y])
    return dataclasses.replace(d, finetune_train=TensorDataset(inputs, labels))


def perturbed_finetune_model(pretrained, scale: float = 0.05):
    """A float64 finetuning model whose embedding starts at W* + noise, and W*."""
    pre64 = copy.deepcopy(pretrained).double()
    ft = finetune_model_from(pre64, 6, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ft.embedding.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return ft, embedding_state(pre64)


def test_updated_mode_reports_ce_plus_proximity(small, pretrained):
    ft, w_star = perturbed_finetune_model(pretrained)
    alpha = 0.3
    _, report = finetune(ft, small, TrainConfig(steps=0), "updated", alpha, w_star)
    x, y = small.finetune_train.tensors
    objective = finetune_objective(ft, x.double(), y, "updated", alpha, w_star)
    ce = finetune_objective(ft, x.double(), y, "fixed", 0.0, None)
    assert report.loss == pytest.approx(value(ce) + alpha * value(proximity(ft, w_star)), rel=1e-10)
    assert report.grad_norm == pytest.approx(grad_norm(objective, list(ft.parameters())), rel=1e-8)
    assert report.grad_norm != pytest.approx(grad_norm(ce, list(ft.parameters())), rel=1e-2)


def test_updated_mode_polish_reaches_stationary_point_of_ce_plus_proximity(small, pretrained):
    # Soft labels give CE a finite minimiser the head alone attains, so at the minimiser
    # of CE + alpha ||W - W*||^2 the embedding is back at W*: only the proximity term
    # pulls it there from the perturbed start.
    data = soft_label_data(small, images=20)
    ft, w_star = perturbed_finetune_model(pretrained)
    start = value(proximity(ft, w_star))
    cfg = TrainConfig(steps=0, polish_iters=300, polish_tol=1e-12)
    trained, report = finetune(ft, data, cfg, "updated", alpha=0.5, w_star=w_star)
    x, y = data.finetune_train.tensors
    full = grad_norm(finetune_objective(trained, x.double(), y, "updated", 0.5, w_star), list(trained.parameters()))
    assert report.polish_evals > 0
    assert full == pytest.approx(report.grad_norm, rel=1e-3, abs=1e-12)
    assert full < 1e-4
    assert value(proximity(trained, w_star)) < 1e-6 * start
    # Control: without the proximity term nothing pulls W back.
    free, _ = finetune(ft, data, cfg, "updated", alpha=0.0, w_star=w_star)
    assert value(proximity(free, w_star)) > 0.1 * start


def test_polish_lowers_the_gradient(small):
    model = build_model("digits", 4, seed=0, dtype=torch.float64)
    _, adam = pretrain(model, small, FAST)
    _, polished = pretrain(model, small, dataclasses.replace(FAST, polish_iters=30))
    assert polished.grad_norm < 0.1 * adam.grad_norm


def test_bad_arguments_are_explained(small, pretrained):
    ft = finetune_model_from(pretrained, 6, seed=0)
    with pytest.raises(ValueError, match="mode"):
        finetune(ft, small, FAST, "frozen")
    with pytest.raises(ValueError, match="alpha"):
        finetune(ft, small, FAST, "updated", alpha=-1.0)
    with pytest.raises(KeyError, match="embedding_state"):
        finetune(ft, small, FAST, "updated", w_star={"embedding.0.weight": torch.zeros(8, 1, 3, 3)})
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(pretrained, small, dataclasses.replace(FAST, batch_size=0))


# --- caching -------------------------------------------------------------------------


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_cache_hits_skip_training(small, tmp_path, monkeypatch):
    pre_calls, ft_calls = Counter(training.pretrain), Counter(training.finetune)
    monkeypatch.setattr(training, "pretrain", pre_calls)
    monkeypatch.setattr(training, "finetune", ft_calls)
    model_cfg = ModelConfig(arch="digits", seed=0)
    cfg = dataclasses.replace(FAST, steps=10)

    p1, f1, info1 = train_two_stage(small, model_cfg, cfg, cfg, "fixed", 0.01, tmp_path)
    assert (pre_calls.calls, ft_calls.calls) == (1, 1)
    assert not info1.pretrain_cached and not info1.finetune_cached
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        [f"{info1.pretrain_key}.pt", f"{info1.finetune_key}.pt"]
    )

    p2, f2, info2 = train_two_stage(small, model_cfg, cfg, cfg, "fixed", 0.01, tmp_path)
    assert (pre_calls.calls, ft_calls.calls) == (1, 1)  # nothing retrained
    assert info2.pretrain_cached and info2.finetune_cached
    assert same_weights(p1, p2) and same_weights(f1, f2)
    assert info2.pretrain_report == info1.pretrain_report

    # alpha is irrelevant when the embedding is fixed
    train_two_stage(small, model_cfg, cfg, cfg, "fixed", 0.5, tmp_path)
    assert ft_calls.calls == 1

    # a finetuning sweep reuses the pretrained model
    _, _, info3 = train_two_stage(small, model_cfg, cfg, cfg, "updated", 0.01, tmp_path)
    assert (pre_calls.calls, ft_calls.calls) == (1, 2)
    assert info3.pretrain_cached and not info3.finetune_cached and info3.pretrain_key == info1.pretrain_key

    # other pretraining settings or another dtype: a new key
    _, _, info4 = train_two_stage(
        small, dataclasses.replace(model_cfg, dtype="float64"), cfg, cfg, "fixed", 0.01, tmp_path
    )
    assert info4.pretrain_key != info1.pretrain_key and pre_calls.calls == 2


def test_no_cache_dir_means_no_files(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(FAST, steps=2)
    pre, ft, info = train_two_stage(small, ModelConfig(), cfg, cfg)
    assert list(tmp_path.iterdir()) == [] and not info.pretrain_cached
    assert ft(small.finetune_test.tensors[0]).shape[1] == 6


def test_settings_key_is_canonical():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1.0}) != settings_key({"a": 1.5})


def test_unreadable_cache_file_is_retrained(small, tmp_path):
    cfg = dataclasses.replace(FAST, steps=5)
    p1, _, info = train_two_stage(small, ModelConfig(), cfg, cfg, cache_dir=tmp_path)
    (tmp_path / f"{info.pretrain_key}.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        p2, _, info2 = train_two_stage(small, ModelConfig(), cfg, cfg, cache_dir=tmp_path)
    assert not info2.pretrain_cached and info2.finetune_cached and same_weights(p1, p2)
