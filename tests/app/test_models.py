import pytest
import torch
from torch import nn

from lissa_influence.experiments.models import (
    ModelConfig,
    TwoStageNet,
    build_embedding,
    build_from_config,
    build_head,
    build_model,
    count_params,
    embedding_names,
    embedding_state,
    finetune_model_from,
    head_names,
    input_shape,
)


def conv(cin, cout, k):
    return cout * cin * k * k + cout


def linear(fin, fout):
    return fin * fout + fout


# Table A, counted by hand.
MNIST_EMBEDDING = conv(1, 32, 5) + conv(32, 64, 5)  # 832 + 51264
CIFAR_EMBEDDING = conv(3, 32, 3) + conv(32, 64, 4) + conv(64, 128, 2) + conv(128, 128, 2)
DIGITS_EMBEDDING = conv(1, 8, 3) + conv(8, 16, 3)


def test_mnist_table_a_shapes_and_counts():
    model = build_model("mnist", 4, seed=0)
    assert count_params(model.embedding) == MNIST_EMBEDDING == 832 + 51264
    assert count_params(model.head) == linear(1024, 4) == 4100
    assert count_params(model) == 56_196
    x = torch.rand(3, 1, 28, 28)
    assert model.embedding(x).shape == (3, 1024)
    assert model(x).shape == (3, 4)


def test_cifar_table_a_shapes_and_counts():
    model = build_model("cifar", 2, seed=0)
    assert count_params(model.embedding) == CIFAR_EMBEDDING == 896 + 32832 + 32896 + 65664
    assert count_params(model.head) == linear(512, 1500) + linear(1500, 2)
    x = torch.rand(2, 3, 32, 32)
    assert model.embedding(x).shape == (2, 512)
    assert model(x).shape == (2, 2)
    assert build_model("cifar", 8, seed=0)(x).shape == (2, 8)


def test_only_plain_smooth_layers_and_no_output_activation():
    allowed = (nn.Conv2d, nn.Tanh, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear, nn.Sequential, TwoStageNet)
    for arch in ("digits", "mnist", "cifar"):
        model = build_model(arch, 3, seed=0)
        assert all(isinstance(m, allowed) for m in model.modules())
        # Table A's max-pooling; the digits variant averages, to keep its loss smooth.
        pool = nn.AvgPool2d if arch == "digits" else nn.MaxPool2d
        assert any(isinstance(m, pool) for m in model.modules())
        assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) and not isinstance(m, pool) for m in model.modules())
        assert isinstance(list(model.head.modules())[-1], nn.Linear)  # logits, no activation
    cifar_acts = [
        type(m) for m in build_model("cifar", 3, 0).modules() if isinstance(m, (nn.Tanh, nn.Conv2d, nn.Linear))
    ]
    # Tanh after each of the 4 convs and the first FC, none after the last FC.
    assert cifar_acts.count(nn.Tanh) == 5 and cifar_acts[-1] is nn.Linear


def test_digits_variant_is_small():
    model = build_model("digits", 4, seed=0)
    assert count_params(model) == DIGITS_EMBEDDING + linear(64, 4) == 1508
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 4)
    assert input_shape("digits") == (1, 8, 8)


def test_names_split_into_embedding_and_head():
    model = build_model("mnist", 4, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert set(embedding_names(model)) | set(head_names(model)) == set(names)
    assert embedding_names(model) == [
        "embedding.0.weight",
        "embedding.0.bias",
        "embedding.3.weight",
        "embedding.3.bias",
    ]
    assert head_names(model) == ["head.0.weight", "head.0.bias"]
    assert set(embedding_state(model)) == set(embedding_names(model))


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("digits", 4, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_model("digits", 4, seed=7)
    c = build_model("digits", 4, seed=8)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters(), strict=True))


def test_dtype_and_config():
    model = build_from_config(ModelConfig(arch="digits", seed=0, dtype="float64"), 3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(ValueError, match="float32"):
        build_model("digits", 3, 0, dtype="half")


def test_finetune_copy_shares_values_not_storage():
    pre = build_model("digits", 4, seed=0)
    ft = finetune_model_from(pre, 6, seed=1)
    assert ft(torch.rand(2, 1, 8, 8)).shape == (2, 6)
    for (n, p), (m, q) in zip(pre.embedding.named_parameters(), ft.embedding.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)
        assert p.data_ptr() != q.data_ptr()
    with torch.no_grad():
        next(ft.embedding.parameters()).add_(1.0)
    assert not torch.equal(next(ft.embedding.parameters()), next(pre.embedding.parameters()))
    # The new head is seeded: same seed, same head.
    again = finetune_model_from(pre, 6, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(ft.head.parameters(), again.head.parameters(), strict=True))


def test_finetune_copy_keeps_dtype():
    pre = build_model("digits", 4, seed=0, dtype=torch.float64)
    ft = finetune_model_from(pre, 6, seed=0)
    assert all(p.dtype == torch.float64 for p in ft.parameters())


def test_unknown_arch_lists_valid_ones():
    for make in (
        lambda: build_embedding("resnet"),
        lambda: build_head("resnet", 3),
        lambda: build_model("resnet", 3, 0),
    ):
        with pytest.raises(ValueError, match=r"digits.*mnist|cifar.*digits"):
            make()


def test_wrong_input_shape_is_explained():
    with pytest.raises(ValueError, match="expects images of shape"):
        build_model("mnist", 4, 0)(torch.rand(2, 1, 8, 8))


def test_classes_must_be_at_least_two():
    with pytest.raises(ValueError, match="classes"):
        build_model("digits", 1, 0)


def test_works_with_torch_func():
    # The influence code evaluates models functionally (functional_call / vmap).
    model = build_model("digits", 4, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.rand(3, 1, 8, 8)
    out = torch.func.vmap(lambda xi: torch.func.functional_call(model, params, (xi.unsqueeze(0),)))(x)
    assert torch.allclose(out.squeeze(1), model(x), atol=1e-6)
