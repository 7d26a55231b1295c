"""The library's contracts: what it imports, the Solver and LinearOperator protocols, the
estimator base, the app's retelling of library messages, and progress output."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

import lissa_influence
from lissa_influence import (
    CG,
    DenseOperator,
    Explicit,
    Influence,
    InfluenceEstimator,
    LinearOperator,
    LiSSA,
    MultiStageInfluence,
    NegativeCurvatureError,
    SolveInfo,
    Solver,
    SolverError,
    SolverWarning,
    aslinearoperator,
)
from lissa_influence.experiments.errors import config_terms, in_config_terms

from conftest import TinyCNN, make_data, rel, train_full_batch

REPO = Path(lissa_influence.__file__).resolve().parents[1]


# --- the core imports nothing of the application ---------------------------------------
def test_core_never_imports_the_application_stack():
    """Import the library and score with both estimators in a fresh interpreter; then
    none of Hydra, OmegaConf, matplotlib, scikit-learn, torchvision or the experiments
    subpackage may be in ``sys.modules``."""
    script = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        from lissa_influence import CG, Influence, LiSSA, MultiStageInfluence, results, score_agreement

        torch.manual_seed(0)
        def net(classes):
            return nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, classes)).double()
        pre, ft = net(3), net(2)
        ft[0].load_state_dict(pre[0].state_dict())
        x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
        xf, yf = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 2, (20,))
        msi = MultiStageInfluence(pre, ft, shared="0", solver=CG(max_iter=50), pretrain_damping=0.5,
                                  finetune_damping=0.5, hessian_samples="all").fit((x, y), (xf, yf))
        scores = msi.scores((xf[:2], yf[:2]))
        single = Influence(pre, solver=LiSSA(depth=500), damping=1.0, hessian_samples="all").fit((x, y))
        single = single.scores((x[:2], y[:2]))
        score_agreement(scores, scores)
        assert scores.shape == (2, 30) and single.shape == (2, 30)
        banned = ("hydra", "omegaconf", "matplotlib", "sklearn", "torchvision", "lissa_influence.experiments")
        print(sorted(m for m in sys.modules if m.split(".")[0] in banned or m.startswith(banned)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", f"the core imported {proc.stdout.strip()}"
    assert "Warning" not in proc.stderr, proc.stderr  # torch's jit deprecation notice stays silent


def test_public_names_are_exported_and_documented():
    """Every name of ``__all__`` exists and has its entry in the API page of the docs site."""
    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    for name in lissa_influence.__all__:
        assert getattr(lissa_influence, name) is not None
        assert f"::: lissa_influence.{name}\n" in api, f"docs/api.md lacks {name}"


# --- the Solver protocol: a user-written solver --------------------------------------------
class ScipyCG:
    """A user's solver: scipy's CG, one right-hand side at a time (the example of docs/architecture.md)."""

    def __init__(self, rtol: float = 1e-10):
        self.rtol = rtol

    def solve(self, A, b, callback=None):
        A = aslinearoperator(A, b)
        products = 0

        def matvec(v):
            nonlocal products
            products += 1
            return A(torch.as_tensor(v, dtype=A.dtype, device=A.device)).double().cpu().numpy()

        op = sla.LinearOperator(A.shape, matvec=matvec, dtype=np.float64)
        rows, converged = [], True
        for row in b.reshape(-1, A.shape[0]):
            x, info = sla.cg(op, row.double().cpu().numpy(), rtol=self.rtol, maxiter=10 * A.shape[0])
            rows.append(torch.as_tensor(x))
            converged &= info == 0
        x = torch.stack(rows).to(b).reshape(b.shape)
        return x, SolveInfo("scipy-cg", converged, 0, products, 0.0)


@pytest.fixture(scope="module")
def two_stage():
    torch.manual_seed(0)
    pre_data = make_data(60, (1, 6, 6), 3, seed=10, noise=3.0)
    ft_data = make_data(40, (1, 6, 6), 2, seed=11, noise=3.0)
    pre = TinyCNN(3).double()
    train_full_batch(pre, pre_data, steps=100, weight_decay=0.1)
    ft = TinyCNN(2).double()
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    return pre, ft, pre_data, ft_data


def msi(two_stage, solver) -> MultiStageInfluence:
    pre, ft, pre_data, ft_data = two_stage
    return MultiStageInfluence(
        pre, ft, solver=solver, pretrain_damping=0.5, finetune_damping=0.5, hessian_samples="all"
    ).fit((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))


def test_a_user_written_solver_drives_the_chain(two_stage):
    assert isinstance(ScipyCG(), Solver) and isinstance(CG(), Solver) and not isinstance(object(), Solver)
    test = (two_stage[3].x[:3], two_stage[3].y[:3])
    ours = msi(two_stage, ScipyCG()).scores(test)
    reference = msi(two_stage, Explicit()).scores(test)
    assert rel(ours, reference) <= 1e-7


# --- the LinearOperator protocol ----------------------------------------------------------
class Diagonal(LinearOperator):
    """A user's operator: ``diag(d)``, a whole stack per call."""

    def __init__(self, d: torch.Tensor):
        self.d, self.calls = d, 0

    @property
    def shape(self):
        return (len(self.d), len(self.d))

    @property
    def dtype(self):
        return self.d.dtype

    @property
    def device(self):
        return self.d.device

    def matmat(self, V):
        self.calls += 1
        return V * self.d


def test_operators_dense_function_and_user_written_agree():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, 7, generator=g, dtype=torch.float64)
    exact = b / d
    for A in (Diagonal(d), DenseOperator(torch.diag(d)), torch.diag(d), lambda v: v * d):
        for solver in (CG(tol=1e-12), LiSSA(depth=500, tol=1e-12), Explicit()):
            x, _ = solver.solve(A, b)
            assert rel(x, exact) <= 1e-9, (type(A).__name__, type(solver).__name__)
    op = Diagonal(d)
    CG(tol=1e-12).solve(op, b)
    assert op.calls <= 8  # stacked products: one call per iteration for all three rows
    assert aslinearoperator(lambda v: v, b).shape == (7, 7)
    with pytest.raises(TypeError, match="LinearOperator"):
        CG().solve("not an operator", b)
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(2, 3))


def test_lissa_runs_deterministically_on_an_operator_without_a_sample():
    d = torch.linspace(1.0, 2.0, 5, dtype=torch.float64)
    op = Diagonal(d)
    assert op.sample_size is None
    with pytest.raises(NotImplementedError, match="sample_size"):
        op.minibatch(2, torch.Generator())
    x, info = LiSSA(batch_size=2, depth=300, tol=1e-12).solve(op, torch.ones(5, dtype=torch.float64))
    assert not info.extra["stochastic"] and rel(x, 1 / d) <= 1e-9


# --- the estimator base ---------------------------------------------------------------------
def test_estimator_state_and_query_vectors(two_stage):
    pre, ft, pre_data, ft_data = two_stage
    fresh = MultiStageInfluence(pre, ft, hessian_samples="all")
    assert isinstance(fresh, InfluenceEstimator) and not fresh.is_fitted
    with pytest.raises(RuntimeError, match=r"MultiStageInfluence\.fit"):
        fresh.scores((ft_data.x[:1], ft_data.y[:1]))
    est = msi(two_stage, CG(tol=1e-10))
    assert est.is_fitted and est.num_scored == 60 and len(est.scored_data) == 60
    test = (ft_data.x[:2], ft_data.y[:2])
    s = est.query_vectors(test)
    loaded = est.as_query_vectors(s.double().numpy())  # as saved to query_vectors.npy
    assert torch.equal(est.scores_from(loaded), est.scores_from(s))
    assert torch.equal(est.removal_effects(test), -est.scores_from(s) / 60)
    with pytest.raises(ValueError, match=r"query vectors s must be \[k, \d+\]"):
        est.as_query_vectors(s[:, :-1])
    single = Influence(pre, damping=0.5, hessian_samples="all").fit((pre_data.x, pre_data.y))
    assert single.is_fitted and single.num_train == single.num_scored == 60


def test_scored_data_under_its_old_keyword(two_stage):
    est = msi(two_stage, CG(tol=1e-10))
    test, pool = (two_stage[3].x[:2], two_stage[3].y[:2]), (two_stage[2].x[:5], two_stage[2].y[:5])
    with pytest.warns(DeprecationWarning, match="pretrain_data= is now data="):
        old = est.scores(test, pretrain_data=pool)
    assert torch.equal(old, est.scores(test, pool)) and old.shape == (2, 5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_data'"):
        est.scores(test, train_data=pool)
    with pytest.raises(TypeError, match="not both"):
        est.removal_effects(test, pool, pretrain_data=pool)


def test_hessian_samples_all_counts_and_bad_values(two_stage):
    pre, ft, pre_data, ft_data = two_stage
    data = ((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "all" asks for every example: no warning
        every = MultiStageInfluence(pre, ft, hessian_samples="all").fit(*data)
    counted = MultiStageInfluence(pre, ft, hessian_samples=np.int64(60), finetune_hessian_samples=40).fit(*data)
    assert torch.equal(every.pre_objective.batch.x, counted.pre_objective.batch.x)
    assert len(every.ft_objective.batch) == 40
    for bad in (0, -3, True, 2.5, "ALL"):
        with pytest.raises(ValueError, match="hessian_samples must be a positive number or 'all'"):
            MultiStageInfluence(pre, ft, hessian_samples=bad).fit(*data)


def test_solver_errors_name_the_stage_and_its_damping(two_stage):
    _, _, pre_data, ft_data = two_stage
    torch.manual_seed(5)
    pre, ft = TinyCNN(3).double(), TinyCNN(2).double()  # untrained: an indefinite Hessian
    ft.embedding.load_state_dict(pre.embedding.state_dict())
    est = MultiStageInfluence(
        pre, ft, solver=CG(), pretrain_damping=0.0, finetune_damping=0.5, hessian_samples="all"
    ).fit((pre_data.x, pre_data.y), (ft_data.x, ft_data.y))
    with pytest.raises(NegativeCurvatureError, match=r"^pretrain solve \(pretrain_damping=0\): CG met negative"):
        est.scores((ft_data.x[:1], ft_data.y[:1]))

    class Refused(SolverError):  # a user's error with a constructor of its own
        def __init__(self, code: int):
            super().__init__(f"refused with code {code}")

    class Refusing:
        def solve(self, A, b, callback=None):
            raise Refused(7)

    est.finetune_solver = Refusing()
    with pytest.raises(SolverError, match=r"^Refused: finetune solve \(finetune_damping=0.5\): refused with code 7"):
        est.scores((ft_data.x[:1], ft_data.y[:1]))


# --- the app retells library messages in config keys ------------------------------------------
@pytest.mark.parametrize(
    "library, config",
    [
        (
            "pretrain solve (pretrain_damping=0.01): ... (gauss_newton=True).",
            "pretrain solve (pretrain.damping=0.01): ... (gauss_newton=true).",
        ),
        (
            "CG did not reach tol=1e-06 in 200 iterations; raise max_iter, add damping, or use preconditioner='jacobi'",
            "CG did not reach solver.tol=1e-06 in 200 iterations; raise solver.max_iter, add damping, or use "
            "solver.preconditioner=jacobi",
        ),
        (
            "diverged with scale=0.1: use scale ≥ 3 or scale='auto'; raise depth, lower scale",
            "diverged with solver.scale=0.1: use solver.scale ≥ 3 or solver.scale=auto; raise solver.depth, lower "
            "solver.scale",
        ),
        (
            "hessian_samples=1000 exceeds the 862 finetuning examples (hessian_samples='all' asks for that)",
            "finetune.hessian_samples=1000 exceeds the 862 finetuning examples (finetune.hessian_samples=all asks "
            "for that)",
        ),
        ("polish_tol=1e-8 and mode='updated'", "polish_tol=1e-8 and mode=updated"),
        (
            "minibatches of batch_size=64 are too noisy. Raise batch_size (or repeats), or raise safety",
            "minibatches of solver.batch_size=64 are too noisy. Raise solver.batch_size (or solver.repeats), or raise "
            "solver.safety",
        ),
    ],
)
def test_library_terms_become_config_keys(library, config):
    assert in_config_terms(library) == config


def test_config_terms_retells_errors_and_warnings():
    with pytest.raises(NegativeCurvatureError, match=r"finetune\.damping=1.*gauss_newton=true") as err:
        with config_terms():
            raise NegativeCurvatureError("finetune solve (finetune_damping=1): use gauss_newton=True")
    assert isinstance(err.value.__cause__, NegativeCurvatureError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with config_terms():
            warnings.warn("raise max_iter", SolverWarning, stacklevel=1)
            assert [str(w.message) for w in caught] == ["raise solver.max_iter"]  # shown at once, not at the end
            warnings.warn("a dependency's tol=3", UserWarning, stacklevel=1)  # attributed to this test file: left alone
    assert [str(w.message) for w in caught] == ["raise solver.max_iter", "a dependency's tol=3"]
    assert caught[0].category is SolverWarning
    assert in_config_terms(in_config_terms("raise max_iter, tol=1")) == "raise solver.max_iter, solver.tol=1"


# --- progress -----------------------------------------------------------------------------
def test_training_shows_its_progress_only_when_asked(capsys):
    from lissa_influence.experiments.data import DataConfig, load_two_stage
    from lissa_influence.experiments.models import build_model
    from lissa_influence.experiments.training import TrainConfig, pretrain

    data = load_two_stage(DataConfig())
    model = build_model("digits", len(data.pretrain_classes), seed=0)
    cfg = TrainConfig(steps=3, lr=1e-3, polish_iters=2)
    quiet, _ = pretrain(model, data, cfg)
    assert capsys.readouterr().err == ""
    loud, _ = pretrain(model, data, cfg, progress=True)
    err = capsys.readouterr().err
    assert "pretrain" in err and "3/3" in err and "loss=" in err and "L-BFGS polish" in err
    assert all(torch.equal(a, b) for a, b in zip(quiet.state_dict().values(), loud.state_dict().values(), strict=True))
