"""Kronecker-factored curvature (K-FAC, EK-FAC) of an objective's Gauss-Newton matrix.

Two modules: :mod:`.factors` holds the fitted factors (:class:`KroneckerCurvature`: its
products, damped inverse and square root, save / load) and :mod:`.fit` fits them from an
:class:`~lissa_influence.objective.Objective` (:func:`fit_kronecker`).

:func:`fit_kronecker` (:mod:`.fit`) approximates the *undamped* generalised Gauss-Newton matrix
``G = (1/N) Σ_i J_iᵀ H_i J_i`` of an :class:`~lissa_influence.curvature.Objective`'s mean
loss (docs/math.md, "Gauss-Newton") by a block-diagonal matrix over one
:class:`~lissa_influence.params.ParamBlock`:

- every ``nn.Linear``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2's linear layer,
  ``x @ W + b`` with ``W`` stored ``[in, out]``) whose weight (and bias, if it has one) lie in the
  block and that runs once per forward pass is one Kronecker block ``G_l ≈ Γ ⊗ Ω``. ``Ω``
  is the second moment of the layer's inputs (with a 1 appended for the bias; im2col
  patches for a convolution), ``Γ`` that of the gradients at the layer's outputs. Extra
  dimensions of the input (tokens, spatial positions) are summed over ("K-FAC expand"):
  ``Ω`` is averaged over them, ``Γ`` summed;
- every other parameter of the block (normalisation layers, embeddings, a weight whose
  bias is left out of the block, shared weights) gets the *fallback*: a diagonal block
  equal to the diagonal of the same Gauss-Newton estimate (the exact GGN diagonal for
  ``fisher="type-2"``). A fit that leaves parameters to it warns once, and says how many
  (:meth:`KroneckerCurvature.describe`).

``kind="kfac"`` takes the eigenvalues ``λ_Γ ⊗ λ_Ω``; ``kind="ekfac"`` keeps the eigenbasis
``Q_Γ ⊗ Q_Ω`` and replaces the eigenvalues by the diagonal of ``G_l`` in that basis
(George et al. 2018): a second pass over the sample, which makes the approximation exact
on that diagonal. The output-space curvature ``H_i`` enters through gradients at the
outputs whose outer products average to it (``fisher``):

- ``"type-2"``: the columns of a square root of ``H_i = ∇²_out loss_i`` (exact);
- ``"mc"``: one label per example sampled from the softmax (cross-entropy only);
- ``"empirical"``: the gradient of the example's own loss (any loss);
- ``"auto"``: type-2 when an example's output has at most 256 entries, else mc for
  cross-entropy, else empirical.

Every inverse is applied in Kronecker form, ``Q (Λ + λ)⁻¹ Qᵀ``, never forming ``P × P``.
Distributed: the factor sums of every rank's shard are weighted by the whole sample and
summed with the objective's ``reduce``, so the ranks get the factors of the whole sample.
"""

from ..operators import FisherType, KroneckerKind
from .factors import Damping, KroneckerCurvature
from .fit import EIGH_FLOAT64_MAX, TYPE2_MAX_OUTPUTS, fit_kronecker

__all__ = [
    "EIGH_FLOAT64_MAX",
    "TYPE2_MAX_OUTPUTS",
    "Damping",
    "FisherType",
    "KroneckerCurvature",
    "KroneckerKind",
    "fit_kronecker",
]
