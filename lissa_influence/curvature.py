"""The damped curvature of an objective as a linear operator: :class:`CurvatureOperator`.

``v ↦ (∇²_{block} L + D) v`` (or the Gauss-Newton matrix in place of the Hessian), with
``L`` an :class:`~lissa_influence.objective.Objective`'s mean loss over its sample. The
operator carries its model: it fits and caches Kronecker factors
(:mod:`lissa_influence.kfac`), forms its dense matrix for the exact solves, and keeps
what solvers store between solves (:attr:`~lissa_influence.operators.LinearOperator.memo`),
which is the :class:`~lissa_influence.operators.ModelOperator` contract.

:class:`~lissa_influence.objective.Objective` and its helpers lived here before; they are
re-exported from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from .kfac import KroneckerCurvature, fit_kronecker
from .objective import (
    CHECKPOINTING,
    ADMode,
    HVPMode,
    Objective,
    autograd_grad,
    check_gauss_newton,
    load_forward_ad,
    no_forward_ad,
    reason,
    saved_tensor_hooks,
)
from .operators import DerivedOperator, FisherType, KroneckerKind, LinearOperator
from .params import ParamBlock
from .solvers.direct import Explicit
from .task import cross_entropy, eval_mode

__all__ = [
    "ADMode",
    "CurvatureOperator",
    "HVPMode",
    "Objective",
    "autograd_grad",
    "check_gauss_newton",
    "cross_entropy",
    "load_forward_ad",
    "no_forward_ad",
    "reason",
    "saved_tensor_hooks",
]


@dataclass(eq=False)
class CurvatureOperator(LinearOperator):
    """The damped curvature ``v ↦ (∇²_{block} L + D) v`` as a :class:`~lissa_influence.operators.LinearOperator`.

    ``damping`` is a scalar ``λ`` (``D = λI``) or a vector of per-coordinate shifts
    (``2α·P_W + λ_ft·I`` for the embedding-updated finetune Hessian, docs/math.md).
    ``gauss_newton=True`` replaces the Hessian by the GGN. ``num_products`` counts
    Hessian-vector products (a ``[k, P]`` stack counts ``k``). It can draw minibatches of
    its Hessian sample (:meth:`minibatch`, for LiSSA's stochastic recursion).

    Args:
        objective: the loss and its sample.
        block: the parameters the curvature is taken in.
        damping: ``D``, a scalar or a ``[P]`` vector, >= 0.
        gauss_newton: the Gauss-Newton matrix in place of the Hessian.
    """

    objective: Objective
    block: ParamBlock
    damping: float | torch.Tensor = 0.0
    gauss_newton: bool = False
    num_products: int = field(default=0, init=False)
    product_path: str | None = field(default=None, init=False)
    """How the last product was formed: ``"retained graphs"``, ``"functional (forward)"``,
    ``"functional (reverse)"``, ``"gauss-newton, functional (...)"`` (None before any)."""

    def __post_init__(self) -> None:
        self.set_damping(self.damping)
        if self.gauss_newton:
            check_gauss_newton(self.objective, "gauss_newton=True")

    def set_damping(self, damping: float | torch.Tensor) -> None:
        """Change the shift ``D`` in place.

        A damping calibration tries several on one operator; Kronecker factors, sketches and
        factorisations that depend on it are rebuilt when used, and :attr:`memo` is cleared.

        Args:
            damping: a scalar ``λ`` or a vector of per-coordinate shifts, finite and >= 0.
        """
        d = torch.as_tensor(damping, dtype=torch.float64)
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
        if d.dim() > 0 and d.shape != (self.block.numel,):
            raise ValueError(f"a damping vector needs {self.block.numel} entries, got shape {tuple(d.shape)}")
        self.damping = damping
        self.memo.clear()  # sketches, subspaces and eigenpairs of the damped operator: of the old damping

    @property
    def size(self) -> int:
        return self.block.numel

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def device(self) -> torch.device:
        return self.objective.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def sample_size(self) -> int:  # type: ignore[override]
        """Examples in the Hessian sample (over all ranks)."""
        return self.objective.total

    def _apply(self, v: torch.Tensor, objective: Objective) -> torch.Tensor:
        if v.shape[-1] != self.size:
            raise ValueError(f"operator acts on vectors of size {self.size}, got shape {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.objective.device)
        self.num_products += 1 if v.dim() == 1 else v.shape[0]
        product = objective.ggn_vp if self.gauss_newton else objective.hvp
        # a product called by a user, outside the estimators, must not build (and leave kept)
        # graphs of the training-mode function, nor meet attention without a double backward
        with eval_mode(objective.model):
            out = product(self.block, v) + self.damping * v
        self._record_path(objective)
        return out

    def _record_path(self, objective: Objective) -> None:
        """Which way the last product went (:attr:`product_path`)."""
        if self.gauss_newton:
            path = f"gauss-newton, functional ({objective.ad_used})"
        elif objective.hvp_mode == "retained" and objective.keeps_graphs(self.block):
            path = "retained graphs"
        else:
            path = f"functional ({objective.ad_used})"
        if "autograd" in objective.fallbacks and not path.startswith("retained"):
            path += ", torch.autograd"
        self.product_path = path

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self._apply(v, self.objective)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The damped curvature times each row of ``V``.

        Args:
            V: ``[k, P]``.

        Returns:
            ``[k, P]``.
        """
        return self._apply(V, self.objective)

    def minibatch(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The operator over a fresh random minibatch of the Hessian sample (for LiSSA's stochastic recursion).

        The indices are drawn over the whole sample, so ranks with the same ``generator``
        state agree on the minibatch and each contributes the part in its shard.

        Args:
            batch_size: examples in the minibatch (``>= sample_size``: the full operator).
            generator: draws the indices.

        Returns:
            An operator whose products are counted on this one.
        """
        if batch_size >= self.objective.total:
            return self
        mini = self.objective.restricted(torch.randperm(self.objective.total, generator=generator)[:batch_size])
        return _Minibatch(self, mini)

    # Kronecker factors fitted on this operator's sample, per (kind, fisher, seed): fitted once, reused by every solve
    _kronecker: dict[tuple[str, str, int], KroneckerCurvature] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def kronecker(
        self, kind: KroneckerKind = "ekfac", fisher: FisherType = "auto", seed: int = 0
    ) -> KroneckerCurvature:
        """K-FAC / EK-FAC factors of this operator's (undamped) Gauss-Newton matrix.

        Fitted on its Hessian sample at the first call (:func:`~lissa_influence.kfac.fit_kronecker`),
        in eval mode, and cached; :meth:`set_kronecker` installs saved ones.

        Args:
            kind: ``"ekfac"`` or ``"kfac"``.
            fisher: the output-curvature estimate (:data:`~lissa_influence.operators.FisherType`).
            seed: draws the labels of ``fisher="mc"``.

        Returns:
            The :class:`~lissa_influence.kfac.KroneckerCurvature`.
        """
        key = (kind, fisher, seed)
        if key not in self._kronecker:
            try:
                with eval_mode(self.objective.model):  # the factors of the function the products take
                    self._kronecker[key] = fit_kronecker(self.objective, self.block, kind, fisher, seed)
            except RuntimeError as e:  # CheckpointError: the recomputation met the fit's module hooks
                if not (saved_tensor_hooks(e) or isinstance(e, torch.utils.checkpoint.CheckpointError)):
                    raise
                raise ValueError(
                    f"{kind} factors: {CHECKPOINTING}, nor can the factors' hooks follow its recomputation. Use an "
                    "exact solver (CG, LiSSA; preconditioner 'nystrom' or 'jacobi'), or fit the factors on the model "
                    "without checkpointing"
                ) from e
        return self._kronecker[key]

    def kronecker_fitted(self, kind: str) -> KroneckerCurvature | None:
        """The factors of ``kind`` fitted or installed so far (any Fisher estimate).

        Args:
            kind: ``"ekfac"`` or ``"kfac"``.

        Returns:
            The factors, or None.
        """
        return next((c for (k, _, _), c in self._kronecker.items() if k == kind), None)

    def set_kronecker(self, curvature: KroneckerCurvature) -> None:
        """Install factors fitted earlier (e.g. :meth:`KroneckerCurvature.load`), for the key they were fitted with.

        Args:
            curvature: the factors; refused when they were fitted for another block.
        """
        curvature.check_block(self.block)
        for fisher in {curvature.fisher, curvature.requested_fisher}:
            self._kronecker[(curvature.kind, fisher, curvature.seed)] = curvature

    def dense(self, block_size: int = 256) -> tuple[torch.Tensor, str]:
        """The dense damped matrix of this operator, and how it was formed.

        Where the curvature is a Gauss-Newton matrix (``gauss_newton``, or a head whose
        outputs are linear in its parameters, as a softmax's linear layer: then the Hessian
        *is* the GGN, checked on one random vector), it is assembled as ``Σ Jᵀ (∇²_out L) J``
        from the outputs' Jacobian (:meth:`~lissa_influence.objective.Objective.gauss_newton_matrix`),
        a few large matrix products per chunk; otherwise from ``P`` products with basis
        vectors. The model is in eval mode meanwhile, as for every product.

        On a shard of the sample (torch.distributed: the objective's ``reduce``), each rank
        assembles its share and the shares are summed, so every rank gets the same matrix.

        Args:
            block_size: basis vectors per stacked product, on the second route.

        Returns:
            ``(matrix [P, P], how)``, ``how`` being ``"gauss-newton jacobian"`` or
            ``"products with basis vectors"``.
        """
        with eval_mode(self.objective.model):
            return self._dense(block_size)

    def _dense(self, block_size: int) -> tuple[torch.Tensor, str]:
        n = self.shape[0]
        damping = torch.as_tensor(self.damping, dtype=self.dtype, device=self.device)
        objective = self.objective
        v = torch.randn(n, dtype=self.dtype, generator=torch.Generator().manual_seed(0)).to(self.device)
        try:  # reduced products: every rank takes the same decision
            ggn = self.gauss_newton or _close(objective.hvp(self.block, v), objective.ggn_vp(self.block, v))
        except (RuntimeError, NotImplementedError):  # no Gauss-Newton products for this model
            ggn = False
        if ggn:
            part: torch.Tensor | None = None
            try:
                part = objective.gauss_newton_matrix(self.block)
            except (RuntimeError, NotImplementedError, MemoryError):  # outputs too large, or not batchable
                pass
            if objective.reduce is not None:  # the ranks agree on the route before summing, or their collectives differ
                failed = objective.reduce(torch.tensor([float(part is None)], dtype=self.dtype, device=self.device))
                part = None if float(failed[0]) > 0 or part is None else objective.reduce(part)
            if part is not None:
                return 0.5 * (part + part.T) + torch.diag(damping.expand(n)), "gauss-newton jacobian"
        like = torch.zeros(1, dtype=self.dtype, device=self.device)
        return Explicit(max_params=n, block_size=block_size).matrix(self, n, like), "products with basis vectors"

    def functional_copy(self) -> CurvatureOperator | None:
        """This operator with functional products (recomputed at each call), where its own
        run on retained gradient graphs; None where they already are functional
        (``hvp_mode="functional"``, or Gauss-Newton products, which are functional whatever
        ``hvp_mode`` says). The copy shares the objective's sample and AD-mode record.

        Returns:
            The copy, or None.
        """
        if self.objective.hvp_mode != "retained" or self.gauss_newton:
            return None
        return dataclasses.replace(self, objective=dataclasses.replace(self.objective, hvp_mode="functional"))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm()) <= 1e-9 * max(float(b.norm()), torch.finfo(b.dtype).tiny)


class _Minibatch(DerivedOperator):
    """One drawn minibatch of a :class:`CurvatureOperator` (its products are counted there)."""

    parent: CurvatureOperator

    def __init__(self, parent: CurvatureOperator, objective: Objective):
        super().__init__(parent)
        self.objective = objective

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.parent._apply(v, self.objective)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.parent._apply(V, self.objective)
