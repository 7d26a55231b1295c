"""lissa_influence.operators: the operator protocol, the Kronecker settings declared once, and
the contract of operators that carry a model."""

import pytest
import torch

from lissa_influence.operators import (
    FISHERS,
    DampedOperator,
    DenseOperator,
    FunctionOperator,
    ModelOperator,
    aslinearoperator,
    check_fisher,
    damping_key,
)


def test_dense_and_function_operators_agree_and_keep_a_memo():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    V = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense, function = aslinearoperator(A, V), aslinearoperator(lambda v: A @ v, V)
    assert isinstance(dense, DenseOperator) and isinstance(function, FunctionOperator)
    assert torch.allclose(dense(V), function(V)) and torch.allclose(dense(V[0]), A @ V[0])
    dense.memo["key"] = 1
    assert dense.memo == {"key": 1} and function.memo == {}
    with pytest.raises(TypeError, match="expected a LinearOperator"):
        aslinearoperator("A", V)  # type: ignore[arg-type]


def test_the_fisher_names_are_declared_once():
    assert FISHERS == ("auto", "type-2", "mc", "empirical")
    for name in FISHERS:
        check_fisher(name)
    with pytest.raises(ValueError, match="fisher='exact'"):
        check_fisher("exact")


def test_a_plain_operator_carries_no_model_and_a_damping_key_is_hashable():
    op = DenseOperator(torch.eye(2))
    assert not isinstance(op, ModelOperator) and not isinstance(op, DampedOperator)
    assert damping_key(0.5) == 0.5 and damping_key(torch.tensor([0.5, 1.0])) == damping_key(torch.tensor([0.5, 1.0]))
