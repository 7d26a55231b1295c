"""The linear-operator protocol that every solver accepts.

A :class:`LinearOperator` is a square linear map ``A`` on vectors of size ``n`` that
knows its ``shape``, ``dtype`` and ``device`` and multiplies a stack of vectors
``[k, n]`` in one call (:meth:`~LinearOperator.matmat`; calling the operator also
takes a single vector ``[n]``). Optionally it averages over a sample of examples and can
draw a minibatch of them (:meth:`~LinearOperator.minibatch`, announced by
``sample_size``), which the stochastic LiSSA recursion uses.

The damped curvature of :mod:`lissa_influence.curvature` is one; :func:`aslinearoperator`
wraps a dense matrix or a plain function ``v ↦ A v`` (applied row by row), in the manner
of ``scipy.sparse.linalg.aslinearoperator``. A user-written operator subclasses
:class:`LinearOperator` and implements ``shape``, ``dtype``, ``device`` and ``matmat``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

KroneckerKind = Literal["ekfac", "kfac"]
"""Which Kronecker factors: eigenvalue-corrected (``"ekfac"``) or plain K-FAC (``"kfac"``)."""

FisherType = Literal["auto", "type-2", "mc", "empirical"]
"""How Kronecker factors estimate the output curvature (:func:`~lissa_influence.kfac.fit_kronecker`)."""

FISHERS: tuple[FisherType, ...] = ("auto", "type-2", "mc", "empirical")
"""The values of :data:`FisherType`."""


def check_fisher(value: str) -> None:
    """Refuse a Fisher estimate that is not one of :data:`FISHERS`.

    Args:
        value: the ``fisher=`` setting.

    Raises:
        ValueError: an unknown value.
    """
    if value not in FISHERS:
        raise ValueError(f"fisher={value!r}: use 'auto', 'type-2', 'mc' or 'empirical'")


class LinearOperator(ABC):
    """A square linear map ``v ↦ A v`` on vectors of size ``shape[0]``.

    Subclasses implement ``shape``, ``dtype``, ``device`` and :meth:`matmat`. An
    operator over a sample of examples may also set ``sample_size`` and implement
    :meth:`minibatch`; ``sample_size is None`` (the default) means it cannot draw
    minibatches.

    Attributes:
        sample_size: examples the operator averages over, when it can draw minibatches of them.
    """

    sample_size: int | None = None
    """Examples the operator averages over, when it can draw minibatches of them."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The product with every row of ``V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for one vector ``[n]`` or each row of a stack ``[k, n]``."""
        if v.dim() == 1:
            return self.matmat(v[None])[0]
        if v.dim() == 2:
            return self.matmat(v)
        raise ValueError(f"expected a vector [n] or a stack [k, n], got shape {tuple(v.shape)}")

    def minibatch(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The same operator over ``batch_size`` examples drawn with ``generator``.

        Args:
            batch_size: examples in the minibatch.
            generator: draws them.

        Returns:
            The minibatch operator.

        Raises:
            NotImplementedError: the operator has no sample (``sample_size is None``).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot draw minibatches (its sample_size is None)")

    @property
    def memo(self) -> dict[Hashable, Any]:
        """What solvers keep between solves on this operator (a preconditioner's sketch, a
        deflation subspace, low-rank eigenpairs), by their own keys. An operator that changes
        clears it (:meth:`~lissa_influence.curvature.CurvatureOperator.set_damping` does);
        pass the same operator object to every solve to reuse it."""
        return self.__dict__.setdefault("_memo", {})


@runtime_checkable
class DampedOperator(Protocol):
    """An operator ``A = H + D`` that knows its shift ``D``: ``damping`` is a scalar ``λ``
    (``D = λI``) or a vector of per-coordinate shifts. Solvers that treat the shift apart
    (EK-FAC, the low-rank solver) or key what they keep by it read it from here.

    Attributes:
        damping: the shift ``D``.
    """

    damping: float | torch.Tensor


@runtime_checkable
class KroneckerFactors(Protocol):
    """Kronecker factors of a Gauss-Newton matrix as solvers use them
    (:class:`~lissa_influence.kfac.KroneckerCurvature` is one): the damped inverse and its
    symmetric square root, and what fitting them cost.

    Attributes:
        kind: ``"ekfac"`` or ``"kfac"``.
        fisher: the Fisher estimate they were fitted with.
        fit_passes: backward passes over the sample the fit took.
        fit_seconds: the time it took.
    """

    kind: str
    fisher: str
    fit_passes: float
    fit_seconds: float

    def inverse(self, V: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
        """``(G̃ + D)⁻¹ V``.

        Args:
            V: ``[k, P]``.
            damping: ``D``, a scalar or a ``[P]`` vector.

        Returns:
            ``[k, P]``.
        """
        ...

    def inverse_sqrt(self, V: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
        """The symmetric ``(G̃ + D)^{-1/2} V``.

        Args:
            V: ``[k, P]``.
            damping: ``D``, a scalar or a ``[P]`` vector.

        Returns:
            ``[k, P]``.
        """
        ...


@runtime_checkable
class ModelOperator(DampedOperator, Protocol):
    """A damped operator that carries a model and its sample
    (:class:`~lissa_influence.curvature.CurvatureOperator` is one): what the solvers that
    need more than products read from it.

    ``damping`` is the shift ``D``; ``num_products`` counts products with it; ``memo``
    (:attr:`LinearOperator.memo`) is what solvers keep between solves on it;
    :meth:`kronecker` fits (once) and returns Kronecker factors of its Gauss-Newton
    matrix; :meth:`dense` forms the damped matrix; :meth:`functional_copy` is the same
    operator with products recomputed each time where its own run on kept graphs.

    Attributes:
        damping: the shift ``D``.
        num_products: products taken so far.
    """

    damping: float | torch.Tensor
    num_products: int

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def memo(self) -> dict[Hashable, Any]: ...

    def __call__(self, v: torch.Tensor) -> torch.Tensor: ...

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The product with every row of ``V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        ...

    def kronecker(self, kind: KroneckerKind = "ekfac", fisher: FisherType = "auto", seed: int = 0) -> KroneckerFactors:
        """K-FAC / EK-FAC factors of the operator's undamped Gauss-Newton matrix, fitted once and kept.

        Args:
            kind: ``"ekfac"`` or ``"kfac"``.
            fisher: the output-curvature estimate.
            seed: draws the labels of ``fisher="mc"``.

        Returns:
            The factors.
        """
        ...

    def dense(self, block_size: int = 256) -> tuple[torch.Tensor, str]:
        """The dense damped matrix, and how it was formed.

        Args:
            block_size: basis vectors per stacked product, where it is formed from products.

        Returns:
            ``(matrix [n, n], how)``.
        """
        ...

    def functional_copy(self) -> ModelOperator | None:
        """The operator with functional products, or None where its products already are.

        Returns:
            The copy, or None.
        """
        ...


def damping_key(damping: float | torch.Tensor) -> Hashable:
    """A hashable fingerprint of a damping.

    Args:
        damping: a scalar or a vector.

    Returns:
        The number, or a digest of a vector's entries.
    """
    d = torch.as_tensor(damping, dtype=torch.float64)
    if d.dim() == 0:
        return float(d)
    return hashlib.sha256(d.detach().cpu().numpy().tobytes()).hexdigest()[:20]


class DenseOperator(LinearOperator):
    """An explicit matrix ``A`` (``[n, n]``) as an operator.

    Args:
        matrix: ``[n, n]``.
    """

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense operator needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return (self.matrix.shape[0], self.matrix.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``V Aᵀ``: the product with every row of ``V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``, in ``V``'s dtype.
        """
        return V @ self.matrix.T.to(V.dtype)


class DerivedOperator(LinearOperator):
    """An operator with the shape, dtype and device of ``parent``, derived from it (a
    minibatch of its sample, a preconditioned form); subclasses implement :meth:`matmat`.

    Args:
        parent: the operator it derives from.
    """

    def __init__(self, parent: LinearOperator):
        self.parent = parent

    @property
    def shape(self) -> tuple[int, int]:
        return self.parent.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device


class FunctionOperator(LinearOperator):
    """A function ``v ↦ A v`` on single vectors ``[n]``, applied to a stack row by row.

    Args:
        matvec: ``v ↦ A v`` on single vectors.
        size: ``n``.
        dtype: the dtype of its vectors.
        device: their device.
    """

    def __init__(self, matvec: Matvec, size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.matvec, self._size, self._dtype, self._device = matvec, size, dtype, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._size, self._size)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The function applied to every row of ``V``.

        Args:
            V: ``[k, n]``.

        Returns:
            ``[k, n]``.
        """
        return torch.stack([self.matvec(row) for row in V])


OperatorLike = LinearOperator | torch.Tensor | Matvec
"""What a solver accepts: an operator, a dense matrix, or a function on vectors."""


def aslinearoperator(A: OperatorLike, like: torch.Tensor) -> LinearOperator:
    """``A`` as a :class:`LinearOperator`.

    Args:
        A: an operator (returned as it is), a dense matrix ``[n, n]``, or a function ``v ↦ A v``.
        like: the right-hand side ``[n]`` or ``[k, n]``; a plain function takes its size,
            dtype and device from it.

    Returns:
        The operator.

    Example:
        >>> import torch
        >>> op = aslinearoperator(lambda v: 2 * v, torch.ones(3))
        >>> op.shape, op(torch.ones(2, 3)).tolist()
        ((3, 3), [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A)
    if callable(A):
        return FunctionOperator(A, like.shape[-1], like.dtype, like.device)
    raise TypeError(f"expected a LinearOperator, a matrix or a function v -> A v, got {type(A).__name__}")
