"""lissa_influence.params: blocks of named parameters and their flat vectors."""

import pytest
import torch

from lissa_influence.params import ParamBlock, check_finite, make_block, name_matcher, named_params, prefix_matcher

from conftest import TinyCNN


def test_flatten_and_unflatten_are_inverses_and_blocks_compose():
    params = named_params(TinyCNN())
    W, T = make_block(params, prefix_matcher("embedding")), make_block(params, name_matcher(["head"]))
    both = W + T
    flat = both.flatten(params)
    assert flat.shape == (both.numel,) and all(torch.equal(both.unflatten(flat)[n], params[n]) for n in both.names)
    stacked = torch.stack([flat, 2 * flat])
    assert both.unflatten(stacked)["head.weight"].shape == (2, *params["head.weight"].shape)
    u = W.flatten(params)
    embedded = both.embed(W, u)
    assert torch.equal(both.restrict(W, embedded), u) and float(both.restrict(T, embedded).abs().sum()) == 0
    with pytest.raises(ValueError, match="overlap"):
        W + W
    with pytest.raises(ValueError, match="entries"):
        both.unflatten(torch.zeros(3))
    assert ParamBlock((), ()).numel == 0


def test_non_finite_parameters_are_named():
    with pytest.raises(FloatingPointError, match="w"):
        check_finite("parameter", {"w": torch.tensor([1.0, float("inf")])})
