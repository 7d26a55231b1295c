"""How a batch becomes a loss: the ``forward`` and ``loss`` contract, in one place.

``outputs = forward(model, batch)``, then the mean loss over the batch's examples:

- ``(x, y)`` items with no ``forward``: ``outputs = model(x)`` and ``loss(outputs, y)``;
- any other items (a dict, a tuple of several tensors), or a custom ``forward``:
  ``loss(outputs, batch)``, where ``batch`` is the collated item structure (``(x, y)``
  for pairs).

Gauss-Newton curvature needs exactly this split of the network (``forward``) from a
convex loss of its outputs. Per-example losses, for scoring, are the same loss on
one-example batches. Every call is functional: the parameters of the block in question
are substituted for the model's own, its buffers (BatchNorm statistics) and frozen
parameters pass through unchanged, or cast to the parameters' dtype where those were cast
(an estimator's ``dtype``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batching import Batch, describe

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch) -> outputs``: calls the model on a collated batch."""

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss(outputs, targets)`` for ``(x, y)`` items, ``loss(outputs, batch)`` otherwise: the
mean over the batch's examples."""


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode, with attention that has second derivatives, restored after.

    Influence is a property of the deterministic (eval-mode) function: every product,
    gradient and score of the library runs inside this context (the operators enter it
    themselves), and so can a user's own derivatives of the same models.

    Args:
        *models: the modules to put in eval mode (each submodule's own mode is restored).

    Meanwhile attention runs in a form that has second derivatives: in eval mode
    ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` may take torch's fused
    inference kernels, and ``scaled_dot_product_attention`` its flash kernels, none of
    which can be differentiated twice; the math kernel can, with the same results.
    """
    # each submodule's own flag: a model may hold some modules in eval mode on purpose
    modes = [(sub, sub.training) for m in models for sub in m.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for m in models:
            m.eval()
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for sub, was in modes:
            sub.training = was


class LossWarning(UserWarning):
    """The loss is computed in a way that makes scores inaccurate (its dtype, its batch mean)."""


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``outputs`` (logits ``[B, C]``) against class indices ``targets``.

    Args:
        outputs: the logits.
        targets: the class of each example, ``[B]``.

    Returns:
        The mean loss, a scalar.

    Example:
        >>> import torch
        >>> float(cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]))) == float(torch.log(torch.tensor(4.0)))
        True
    """
    return nn.functional.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Task:
    """The contract between a model and its loss: how a batch becomes outputs, and their mean loss.

    One object that :class:`~lissa_influence.objective.Objective`,
    :class:`~lissa_influence.scoring.PerExample`, :func:`probe` and the estimators take in
    place of a separate ``forward`` and ``loss`` (:mod:`lissa_influence.hf`'s ``Task`` has
    the same two members).

    Args:
        loss: ``loss(outputs, y)`` for ``(x, y)`` items with no ``forward``, else
            ``loss(outputs, batch)``; the mean over the batch's examples.
        forward: ``forward(model, batch) -> outputs`` (None: ``model(x)`` on ``(x, y)`` pairs).

    Example:
        >>> import torch
        >>> from lissa_influence.batching import Batch
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = Batch(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
        >>> Task().mean_loss(model, dict(model.named_parameters()), batch).shape
        torch.Size([])
    """

    loss: LossFn = cross_entropy
    forward: Forward | None = None

    def outputs(self, model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> Any:
        """The model's outputs on ``batch`` with ``params`` in place of its own (:func:`outputs`).

        Args:
            model: the model.
            params: parameters (and buffers) to substitute, by name.
            batch: the batch.

        Returns:
            Whatever ``forward`` (or ``model(x)``) returns.
        """
        return outputs(model, params, batch, self.forward)

    def mean_loss(self, model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The mean loss of ``model`` at ``params`` over ``batch``.

        Args:
            model: the model.
            params: parameters (and buffers) to substitute, by name.
            batch: the batch.

        Returns:
            The loss, a scalar.
        """
        return mean_loss(self.loss, self.outputs(model, params, batch), batch, self.forward)


class _Call(nn.Module):
    """A module whose forward is ``fn(model, batch)``, so that ``functional_call``
    substitutes parameters wherever ``fn`` reaches into the model."""

    def __init__(self, model: nn.Module, fn: Forward):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def check_batch(batch: Batch, forward: Forward | None, what: str) -> None:
    """A batch that the default forward cannot take fails here, saying what it received.

    Args:
        batch: the batch.
        forward: the user's forward (None: ``model(x)``).
        what: the data, in the error.
    """
    if forward is None and not batch.pair:
        raise TypeError(
            f"{what}: the items batch to {describe(batch.x)}, not (x, y) pairs, so the default forward model(x) "
            "does not apply and no target can be told apart. Pass forward=lambda model, batch: ... returning the "
            "model's outputs (MultiStageInfluence: pretrain_forward= / finetune_forward=), and a "
            "loss(outputs, batch) that reads its targets from the batch."
        )


def cast_state(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's floating buffers and frozen parameters in the dtype of ``params``.

    Where ``params`` are a cast of its parameters (``dtype=torch.float64`` on a float32
    model): a layer cannot mix the two dtypes. Cast at each call, so that they stay the
    model's own.

    Args:
        model: the model.
        params: the parameters used in its place.

    Returns:
        The cast tensors by name (nothing where no cast is needed).
    """
    name, p = next(iter(params.items()), (None, None))
    if name is None or p is None or not p.is_floating_point():
        return {}
    try:
        own = model.get_parameter(name)
    except AttributeError:  # not one of the model's parameters (a head objective's buffer, say)
        return {}
    if own.dtype == p.dtype:
        return {}
    rest = [*model.named_buffers(), *((n, q) for n, q in model.named_parameters() if n not in params)]
    return {n: t.detach().to(p.dtype) for n, t in rest if t.is_floating_point() and t.dtype != p.dtype}


def outputs(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, forward: Forward | None) -> Any:
    """The model's outputs on ``batch`` with ``params`` in place of its own.

    Its float buffers and frozen parameters in their dtype, where that differs from the
    model's (:func:`cast_state`).

    Args:
        model: the model.
        params: parameters (and buffers) to substitute, by name.
        batch: the batch.
        forward: the user's forward (None: ``model(x)``).

    Returns:
        Whatever the forward returns.
    """
    tensors = {**cast_state(model, params), **params}
    if forward is None:
        return functional_call(model, tensors, (batch.x,))
    # a wrapper per call (microseconds): keeping them would keep every model alive
    return functional_call(_Call(model, forward), {f"model.{n}": p for n, p in tensors.items()}, (batch.tree,))


def mean_loss(loss_fn: LossFn, out: Any, batch: Batch, forward: Forward | None) -> torch.Tensor:
    """``loss(outputs, y)`` for pairs with the default forward, ``loss(outputs, batch)`` otherwise.

    Args:
        loss_fn: the loss.
        out: the model's outputs.
        batch: the batch.
        forward: the user's forward (None: ``model(x)``).

    Returns:
        The mean loss.
    """
    return loss_fn(out, batch.y if forward is None else batch.tree)


def probe(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, task: Task, what: str) -> Any:
    """One forward pass and loss on the first example of ``batch``, so that data the model or
    the loss cannot take fails by name here, not deep inside torch.

    Args:
        model: the model.
        params: its parameters, by name.
        batch: the data (its first example is run).
        task: the forward and the loss.
        what: the data, in errors.

    Returns:
        The model's outputs on the first example.
    """
    forward, loss_fn = task.forward, task.loss
    one = batch.select(slice(0, 1))
    try:
        out = outputs(model, params, one, forward)
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        raise ValueError(
            f"{what}: the model cannot take its examples ({describe(one.tree)} for one example): "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if forward is None and loss_fn is cross_entropy:
        check_labels(batch, out, what)
    try:
        value = mean_loss(loss_fn, out, one, forward)
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{what}: the loss cannot take the model's outputs ({shape}) and "
            f"{'the targets ' + describe(one.y) if forward is None else 'the batch'}: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    check_loss_dtype(value, params, what)
    return out


def check_loss_dtype(value: Any, params: Mapping[str, torch.Tensor], what: str) -> None:
    """Warn when the loss is computed in a lower precision than the parameters: every
    derivative is then only that accurate, and a solver asked for more never gets there.

    Args:
        value: the loss of a batch.
        params: the parameters it was computed with.
        what: the data, in the warning.
    """
    p = next(iter(params.values()), None)
    if not isinstance(value, torch.Tensor) or p is None or not value.is_floating_point() or not p.is_floating_point():
        return
    if torch.finfo(value.dtype).eps > torch.finfo(p.dtype).eps:
        warnings.warn(
            f"{what}: the loss is {value.dtype} while the parameters are {p.dtype}, so scores are accurate to "
            f"about {torch.finfo(value.dtype).eps:.0e} at best and a solver asked for more will not converge (a "
            "transformers model's own loss casts the logits with .float(); lissa_influence.hf.task computes "
            "the loss in the model's dtype)",
            LossWarning,
            stacklevel=4,
        )


def check_batch_mean(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    forward: Forward | None,
    loss_fn: LossFn,
    what: str,
    examples: int = 4,
) -> None:
    """Warn when the loss of a few examples is not the mean of their one-example losses.

    Curvature is taken of the batch loss, scores of the per-example losses; both are the
    same function only when a batch's loss is the mean of its examples'. A token mean over
    the whole padded batch (a Hugging Face model's ``outputs.loss``) or a sum is not.

    Args:
        model: the model.
        params: its parameters.
        batch: a batch of at least two examples (fewer: nothing to check).
        forward: the user's forward (None: ``model(x)``).
        loss_fn: the loss.
        what: the data, in the warning.
        examples: how many of the first examples to compare (a pair of equal-length
            sequences would not tell a token mean over the batch from a per-sequence one).
    """
    n = min(len(batch), examples)
    if n < 2:
        return
    with torch.no_grad():
        ones = [
            mean_loss(loss_fn, outputs(model, params, b, forward), b, forward)
            for b in (batch.select(slice(i, i + 1)) for i in range(n))
        ]
        few = batch.select(slice(0, n))
        together = mean_loss(loss_fn, outputs(model, params, few, forward), few, forward)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point() for t in (*ones, together)):
        return
    mean = torch.stack(ones).mean()
    scale = max(float(t.abs()) for t in (*ones, mean, torch.ones(())))
    tol = 1000 * torch.finfo(together.dtype).eps  # rounding of a few forward passes, batched or not
    if abs(float(together - mean)) > tol * scale:
        warnings.warn(
            f"{what}: the loss of the first {n} examples together ({float(together):.6g}) is not the mean of their "
            f"one-example losses ({float(mean):.6g}): the curvature (batch losses) and the "
            "scores (per-example losses) would be of different functions. Return the mean over the batch of each "
            "example's loss (for sequences: average each sequence's tokens first; a transformers model's own "
            "outputs.loss averages tokens over the batch: use lissa_influence.hf.task)",
            LossWarning,
            stacklevel=4,
        )


def check_loss_of_outputs(out: Any, loss_fn: LossFn, batch: Batch, forward: Forward | None, what: str) -> None:
    """Refuse, by name, outputs that Gauss-Newton curvature cannot split from the loss.

    The Gauss-Newton matrix is ``Jᵀ (∇²_out loss) J``: the loss must be a function of
    per-example outputs. A loss the model computed itself (a Hugging Face model called with
    ``labels``, and ``loss=lambda o, b: o["loss"]``) is an output that the loss only reads,
    so its output Hessian is zero, and the Gauss-Newton matrix with it; a cache object
    among the outputs cannot be differentiated through.

    Args:
        out: the model's outputs on ``batch`` (a few examples).
        loss_fn: the loss of :mod:`lissa_influence.task`.
        batch: the batch ``out`` came from.
        forward: the user's forward (None: ``model(x)``).
        what: what to call the curvature in errors (``"gauss_newton=True"``, ``"EK-FAC"``).

    Raises:
        ValueError: naming the output and the change to make.
    """
    leaves, spec = tree_flatten(out)
    odd = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)})
    if odd:
        raise ValueError(
            f"{what}: the model's outputs hold {', '.join(odd)} objects, which the Gauss-Newton matrix cannot "
            "differentiate through (a transformers cache: call the model with use_cache=False, or return only "
            "the tensors the loss needs, e.g. forward=lambda m, b: m(**b).logits; lissa_influence.hf.task does both)"
        )
    floats = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in leaves]
    with torch.enable_grad():
        value = mean_loss(loss_fn, tree_unflatten(floats, spec), batch, forward)
        if not value.requires_grad:
            return  # a loss of no floating output: nothing to check here (the products will say)
        grads = torch.autograd.grad(value, [t for t in floats if t.is_floating_point()], allow_unused=True)
    scalars = [g for t, g in zip([t for t in floats if t.is_floating_point()], grads, strict=True) if t.dim() == 0]
    if any(g is not None and bool(g.ne(0).any()) for g in scalars):
        raise ValueError(
            f"{what}: the loss reads a scalar the model returned (a loss computed inside the model, such as a "
            "Hugging Face model's outputs.loss when labels are passed), so it is not a function of per-example "
            "outputs and its Gauss-Newton matrix would be zero. Call the model without labels and compute the "
            "loss from its logits (lissa_influence.hf.task), or use the Hessian (gauss_newton=False, a solver "
            "other than EK-FAC)"
        )


def check_labels(batch: Batch, out: Any, what: str) -> None:
    """Class labels for the default cross-entropy: integers in ``[0, classes)``.

    Args:
        batch: the batch.
        out: the model's outputs on it (their last dimension counts the classes).
        what: the data, in the error.
    """
    y = batch.y
    if not isinstance(y, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() != 2:
        return
    if y.is_floating_point():
        if y.shape[1:] == out.shape[1:]:
            return  # class probabilities: cross-entropy takes those too
        raise ValueError(
            f"{what}: the targets are {y.dtype} of shape {tuple(y.shape)}; cross-entropy takes class indices "
            "(an integer tensor, e.g. y.long()) or class probabilities of the outputs' shape. For regression pass "
            "loss=torch.nn.functional.mse_loss"
        )
    classes = out.shape[1]
    if bool((y == -100).any()):
        raise ValueError(
            f"{what}: label -100 (cross-entropy's ignore_index) at examples "
            f"{(y == -100).nonzero().squeeze(1).tolist()[:10]}: such an example has no loss and no influence; "
            "drop those examples, or pass a loss of your own"
        )
    bad = ((y < 0) | (y >= classes)).nonzero().squeeze(1)
    if len(bad):
        raise ValueError(
            f"{what}: labels {sorted(set(y[bad].tolist()))[:10]} at examples {bad.tolist()[:10]} are outside the "
            f"model's {classes} classes [0, {classes})"
        )
