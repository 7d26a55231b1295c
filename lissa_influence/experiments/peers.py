"""dattri's own attribution methods on the same model, data and ground truth (``single_lds.peers``).

dattri (``pip install ".[peers]"``, version 0.3.0) is run exactly as its benchmark script
``experiments/benchmark_result.py`` runs it on MNIST-10: the mean cross-entropy as the
loss, the training set cached in one batch, and

- ``if_explicit``, ``if_cg`` (``max_iter=10``), ``if_arnoldi`` (``max_iter=50``) at a
  ``regularization`` (dattri's name for the damping) given by the caller;
- ``if_lissa`` with ``recursion_depth=100`` and ``batch_size=50`` (its best setting there);
- ``trak_k``: TRAK on ``k`` models (the caller trains them: dattri uses models trained on
  random halves of the training set), projection dimension 512, the margin
  ``log p − log(1 − p)`` as the output and ``p`` as the correct-class probability.

Scores come back as ``[n_test, n_train]`` in this package's sign (positive: the example
raises the test loss, docs/math.md): dattri's scores, of its influence functions and of
TRAK alike, measure helpfulness (their LDS against retrained test losses comes out
negative as dattri returns them), so both are negated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

INFLUENCE_PEERS = ("if_explicit", "if_cg", "if_lissa", "if_arnoldi")


def check(name: str) -> None:
    """``name`` is a dattri method: ``if_explicit``, ``if_cg``, ``if_lissa``, ``if_arnoldi`` or ``trak_<k>``."""
    trak = name.startswith("trak_") and name[5:].isdigit() and int(name[5:]) >= 1
    if not trak and name not in INFLUENCE_PEERS:
        raise ValueError(
            f"single_lds.peers has {name!r}; use if_explicit, if_cg, if_lissa, if_arnoldi or trak_<k> (e.g. trak_10)"
        )


def _dattri():
    try:
        import dattri  # noqa: F401
    except ImportError:
        raise ImportError(
            "single_lds.peers runs dattri's methods, and dattri is not installed: pip install '.[peers]' "
            "(or pip install dattri==0.3.0), or set single_lds.peers=[]"
        ) from None


def dattri_scores(
    name: str,
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    damping: float = 1e-2,
    trak_models: Sequence[nn.Module] = (),
) -> tuple[torch.Tensor, float]:
    """One dattri method's scores and its wall time.

    Args:
        name: a method of :data:`INFLUENCE_PEERS`, or ``trak_<k>`` for TRAK on ``k`` models.
        model: the trained model (the influence functions' checkpoint; TRAK's template).
        train, test: ``(x, y)`` of the scored training examples and the test queries.
        damping: the influence functions' ``regularization``.
        trak_models: TRAK's ``k`` trained models.

    Returns:
        ``([n_test, n_train] scores in this package's sign, seconds)``.
    """
    check(name)
    _dattri()
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.task import AttributionTask

    model = model.eval()
    train_set, test_set = TensorDataset(*train), TensorDataset(*test)
    t0 = time.perf_counter()
    if name.startswith("trak_"):
        scores = _trak(model, trak_models, train_set, test_set)
        return -scores.T.contiguous(), time.perf_counter() - t0

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y.long())

    task = AttributionTask(model=model, loss_func=loss, checkpoints=model.state_dict())
    make = {
        "if_explicit": lambda: IFAttributorExplicit(task=task, device="cpu", regularization=damping),
        "if_cg": lambda: IFAttributorCG(task=task, device="cpu", regularization=damping, max_iter=10),
        "if_lissa": lambda: IFAttributorLiSSA(task=task, device="cpu", recursion_depth=100, batch_size=50),
        "if_arnoldi": lambda: IFAttributorArnoldi(task=task, device="cpu", regularization=damping, max_iter=50),
    }
    attributor = make[name]()
    attributor.cache(DataLoader(train_set, batch_size=len(train_set)))
    with torch.no_grad():
        scores = attributor.attribute(DataLoader(train_set, batch_size=500), DataLoader(test_set, batch_size=500))
    return -scores.T.contiguous().double(), time.perf_counter() - t0


def _trak(template: nn.Module, models: Sequence[nn.Module], train_set, test_set) -> torch.Tensor:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    if not models:
        raise ValueError("TRAK needs the models it ensembles (trak_models)")

    def margin(params, batch):
        x, y = batch
        logits = torch.func.functional_call(template, params, (x.unsqueeze(0),))
        logp = -nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def probability(params, batch):
        x, y = batch
        logits = torch.func.functional_call(template, params, (x.unsqueeze(0),))
        return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0).long()))

    task = AttributionTask(model=template, loss_func=margin, checkpoints=[m.state_dict() for m in models])
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=probability,
        device="cpu",
        projector_kwargs={"proj_dim": 512, "device": "cpu"},
    )
    attributor.cache(DataLoader(train_set, batch_size=500))
    with torch.no_grad():
        return attributor.attribute(DataLoader(test_set, batch_size=500)).double()
