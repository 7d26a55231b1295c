"""Typed Hydra configuration: the schema of ``conf/`` and its conversion to library objects.

The schema is registered in Hydra's ConfigStore, so a misspelt key or a value of the
wrong type fails when the config is composed, with Hydra's message naming the key.
The data, model and training sections mirror the frozen dataclasses of the experiments
(:class:`~lissa_influence.experiments.data.DataConfig`,
:class:`~lissa_influence.experiments.models.ModelConfig`,
:class:`~lissa_influence.experiments.training.TrainConfig`); Hydra needs mutable copies of
them, made here field by field so the two never drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, cast

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..damping import check_damping
from ..solvers import CG, EKFAC, Explicit, Identity, LiSSA, LowRank
from .data import DataConfig
from .gpt2 import Gpt2Config
from .models import ModelConfig
from .training import TrainConfig


def _mutable(cls: type, **defaults: Any) -> Any:  # a dataclass made at run time: Any to the type checker
    """A mutable dataclass with the fields of frozen ``cls`` (tuples become lists)."""
    hints = typing.get_type_hints(cls)  # resolves string annotations
    fields = []
    for f in dataclasses.fields(cls):
        ftype = _listify(hints[f.name])
        default = defaults.get(f.name, f.default)
        if isinstance(default, tuple):
            fields.append((f.name, ftype, field(default_factory=lambda d=default: list(d))))  # type: ignore[misc]
        else:
            fields.append((f.name, ftype, field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _listify(tp: Any) -> Any:
    """``tuple[int, ...]`` -> ``list[int]``, keeping ``Optional``: OmegaConf stores sequences as lists."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        return list[args[0]] if args else list  # type: ignore[valid-type]
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return Optional[_listify(inner[0])]
    return tp


DataSchema = _mutable(DataConfig)
ModelSchema = _mutable(ModelConfig)
TrainSchema = _mutable(TrainConfig)


@dataclass
class SolverSchema:
    """One solver's settings; ``name`` picks the solver, the other keys are its options
    (keys that belong to another solver are ignored)."""

    name: str = "cg"  # cg | lissa | explicit | identity | ekfac | kfac | lowrank
    # CG
    tol: float = 1e-6
    max_iter: int = 200
    preconditioner: str | None = None  # null | jacobi | nystrom | ekfac | kfac
    block: bool = True  # block CG: one Krylov space for all right-hand sides
    rank: int = 64  # preconditioner=nystrom: the sketch's rank (products spent building it); lowrank: eigenpairs kept
    deflate: int = 0  # CG: deflate a recycled subspace of this many vectors (0: off; docs/math.md)
    steps: int | None = None  # lowrank: Lanczos steps (null: 2 x rank)
    # K-FAC / EK-FAC (solver.name=ekfac|kfac, or preconditioner=ekfac|kfac)
    fisher: str = "auto"  # auto | type-2 | mc | empirical
    # LiSSA
    scale: str = "auto"  # "auto" or a number
    damping: float = 0.0  # LiSSA's own damping d (adds d*scale to the stage damping)
    depth: int = 1000
    repeats: int = 1
    batch_size: int | None = None
    safety: float = 1.2
    # Explicit
    method: str = "auto"
    max_params: int = 10_000
    seed: int = 0


@dataclass
class StageSchema:
    damping: Any = 1e-2  # a number >= 0, auto (calibrated against retraining) or heuristic; checked by check()
    hessian_samples: Any = 1000  # a count (seeded subsample) or "all"; checked by check()
    train: TrainSchema = field(default_factory=TrainSchema)  # type: ignore[valid-type]


@dataclass
class ValidateSchema:
    """Leave-one-out validation (docs/validation.md)."""

    enabled: bool = False
    num_examples: int = 30  # K removed pretraining examples: a third most harmful, a third most helpful, a third random
    # which scored test point: highest_loss | misclassified | random | mean (their mean loss) | an index
    test_point: str = "highest_loss"
    test_index: Optional[int] = None  # replaced by test_point; setting it fails with a message saying so
    pretrain_steps: int = 100
    finetune_steps: int = 100
    polish_iters: int = 0  # L-BFGS iterations after the Adam steps of each retraining (0: the paper's protocol)
    polish_tol: float = 1e-8  # the polish stops once every gradient entry is below this
    seed: int = 0
    # retraining seeds validate.seed, +1, ...: the control and every removal retrained under each, changes averaged,
    # and their split-half agreement reported as the noise floor (minibatch retraining; deterministic ones use one)
    seeds: int = 1
    batch_size: Optional[int] = None  # the retraining's minibatch size (null: the stage's train.batch_size)
    lr: Optional[float] = None  # the retraining's Adam learning rate (null: the stage's train.lr)
    # other solvers judged on the same removals and retrainings (e.g. [identity], the paper's ablation)
    baselines: list[str] = field(default_factory=list)


@dataclass
class AnalysisSchema:
    """The paper's analyses (lissa_influence/experiments/analyses.py, docs/analyses.md); ``none`` runs the main job."""

    name: str = "none"  # none | task_similarity | finetune_size | influential_examples | lds | single_lds | gpt2
    # task_similarity (section 4.3, Figure B): one pretrained model, two finetuning tasks
    same_task_classes: list[int] | None = None  # null: data.pretrain_classes
    other_task_classes: list[int] | None = None  # required for task_similarity
    # finetune_size (section 4.4, Figure C): model C, and model D with factor x the examples and steps
    base_subsample: int | None = None  # model C's finetuning examples (null: data.finetune_subsample)
    factor: int = 3
    # influential_examples: remove the top `remove` harmful (then helpful) examples and retrain
    remove: int = 10


@dataclass
class LdsSchema:
    """The linear datamodeling score (``analysis.name=lds``; lissa_influence/experiments/lds.py,
    docs/validation.md); ignored otherwise."""

    num_subsets: int = 50  # M seeded subsets of the pretraining set
    fraction: float = 0.5  # the fraction of the pretraining examples each subset keeps (TRAK's alpha)
    seed: int = 0  # seeds the subsets and the retraining (the from-scratch protocol's fixed seed)
    protocol: str = "warm"  # warm: from the trained weights with the validate.* settings | scratch: fresh init
    modes: list[str] = field(default_factory=lambda: ["fixed", "updated"])  # each mode has its own ground truth
    variants: list[str] = field(
        default_factory=lambda: ["cg", "lissa", "ekfac", "gauss_newton", "identity", "single_stage"]
    )
    noise_floor: bool = True  # also retrain under noise_seed: the LDS of one retraining seed against another
    noise_seed: int = 1
    rank: int = 0  # with world > 1: retrain only subsets i = rank (mod world), for parallel jobs sharing cache_dir
    world: int = 1


@dataclass
class SingleLdsSchema:
    """The single-stage LDS on dattri's MNIST-10 benchmark (``analysis.name=single_lds``;
    lissa_influence/experiments/single_lds.py, docs/benchmarks.md); ignored otherwise."""

    arch: str = "lr"  # dattri's lr | mlp, each with its own training recipe
    train_size: int = 4500  # of the 5,000 bundled digits (dattri: 5,000 of MNIST's 60,000)
    test_size: int = 500
    split_seed: int = 0
    num_subsets: int = 100  # dattri: 100 subsets, each retrained once
    fraction: float = 0.5
    seed: int = 0  # the subsets, and their training seeds
    noise_floor: bool = True  # retrain every subset under a second seed
    methods: list[str] = field(default_factory=lambda: ["cg", "ekfac"])  # solver names, solver.* settings
    dampings: list[Any] = field(default_factory=lambda: [1e-2, "auto"])  # numbers, auto or heuristic
    hessian_samples: Any = "all"  # examples in the Hessian: a count or "all"
    ensemble: int = 1  # scores averaged over this many independently trained models
    ensemble_fraction: float = 1.0  # the fraction of the training set each ensemble model trains on
    fit_epochs: Optional[int] = None  # the scored models' training epochs (the fit point; null: the recipe's)
    calibration_points: int = 50  # damping=auto: the first test points its agreement is measured on
    peers: list[str] = field(default_factory=list)  # dattri's: if_explicit, if_cg, if_lissa, if_arnoldi, trak_<k>


@dataclass
class CalibrationSchema:
    """``pretrain.damping=auto`` / ``finetune.damping=auto`` (lissa_influence/experiments/calibration.py,
    docs/validation.md): each stage's damping chosen from ``grid`` by agreement with ``budget`` retrainings;
    ``heuristic_fraction`` for ``damping=heuristic``."""

    grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    budget: int = 10  # retrainings: leave-one-out removals (main job) or LDS subsets (analysis.name=lds)
    seed: int = 1  # draws the calibration's removals or subsets, apart from those validated
    heuristic_fraction: float = 0.1  # damping=heuristic: this fraction of the curvature's mean eigenvalue


@dataclass
class AccuracySchema:
    """Solver accuracy against the explicit solve (``lissa-influence-accuracy``,
    lissa_influence/experiments/accuracy.py, docs/benchmarks.md); ignored by the main job."""

    top_k: int = 10  # overlap of the top_k most influential examples (by |I|) with the reference's
    block_size: int = 8  # basis vectors per stacked product when the reference builds the dense Hessians
    max_params: int = 10_000  # the reference refuses larger stages (a P x P float matrix each)
    trace: bool = True  # record the error after every solver iteration (the error-vs-HVP curves)


@dataclass
class RunSchema:
    data: DataSchema = field(default_factory=DataSchema)  # type: ignore[valid-type]
    model: ModelSchema = field(default_factory=ModelSchema)  # type: ignore[valid-type]
    solver: SolverSchema = field(default_factory=SolverSchema)
    pretrain: StageSchema = field(default_factory=lambda: StageSchema(damping=1e-2))
    finetune: StageSchema = field(default_factory=lambda: StageSchema(damping=1e-8))
    validate: ValidateSchema = field(default_factory=ValidateSchema)
    analysis: AnalysisSchema = field(default_factory=AnalysisSchema)
    accuracy: AccuracySchema = field(default_factory=AccuracySchema)
    lds: LdsSchema = field(default_factory=LdsSchema)
    single_lds: SingleLdsSchema = field(default_factory=SingleLdsSchema)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    gpt2: Gpt2Config = field(default_factory=Gpt2Config)  # analysis.name=gpt2 (experiments/gpt2.py)
    mode: str = "fixed"  # fixed | updated
    alpha: float = 0.01  # proximity weight of alpha*||W - W*||^2 (mode=updated)
    seed: int = 0
    test_points: int = 8  # finetuning test points scored (the first of a seeded permutation)
    query: str = "each"  # each: one score row per test point; mean: the mean test loss as one query
    scoring: str = "auto"  # auto | jvp | grad
    batch_size: int = 256
    gauss_newton: bool = False
    top_k: int = 6  # helpful / harmful examples shown per test point
    cache_dir: str = "~/.cache/lissa_influence"
    threads: int | None = None  # torch.set_num_threads; null keeps torch's default
    shard_size: int = 4096  # pretraining examples per score shard (scores/shard_*.npy; a rerun resumes)
    progress: bool = True
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    allow_unconverged: bool = False  # score even from a solve that made no progress (relative residual >= 1)
    hvp: str = "retained"  # retained (each chunk's gradient graph kept, one backward per product) | functional
    graph_budget_mib: int = 2048  # hvp=retained: the kept graphs' limit (over it: functional products)
    query_chunk: int | None = None  # test queries per solve (null: all in one); a deflated CG recycles across chunks
    head_only: str = "auto"  # auto | true | false: fixed-mode finetune products on the head alone
    exact_finetune: str = "auto"  # auto | true | false: fixed-mode finetune solved by factoring the head in float64


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunSchema)
    cs.store(group="data", name="schema", node=DataSchema)
    cs.store(group="model", name="schema", node=ModelSchema)
    cs.store(group="solver", name="schema", node=SolverSchema)


# -- conversion to library objects -----------------------------------------------------
def _plain(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    return dataclasses.asdict(node)


def to_frozen(cls: type, node: Any):
    """The library's frozen config from a schema node (lists back to tuples)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in _plain(node).items()}
    return cls(**values)


SOLVERS = ("cg", "lissa", "explicit", "identity", "ekfac", "kfac", "lowrank")


def build_solver(node: Any):
    s = _plain(node)
    name = s["name"]
    if name == "cg":
        return CG(
            tol=s["tol"],
            max_iter=s["max_iter"],
            preconditioner=s["preconditioner"],
            block=s["block"],
            rank=s["rank"],
            fisher=s["fisher"],
            seed=s["seed"],
            deflate=s["deflate"],
        )
    if name == "lowrank":
        return LowRank(rank=s["rank"], steps=s["steps"], seed=s["seed"])
    if name in ("ekfac", "kfac"):
        return EKFAC(kind=name, fisher=s["fisher"], seed=s["seed"])
    if name == "lissa":
        scale = s["scale"]
        scale = scale if scale == "auto" else float(scale)
        return LiSSA(
            scale=scale,
            damping=s["damping"],
            depth=s["depth"],
            repeats=s["repeats"],
            batch_size=s["batch_size"],
            seed=s["seed"],
            tol=s["tol"],
            safety=s["safety"],
        )
    if name == "explicit":
        return Explicit(method=s["method"], max_params=s["max_params"])
    if name == "identity":
        return Identity()
    raise ValueError(f"unknown solver.name={name!r}; use one of {SOLVERS}")


# Keys that do not change the scores; a results folder is reused across changes to them.
NOT_HASHED = (
    "progress",
    "threads",
    "top_k",
    "validate",
    "cache_dir",
    "shard_size",
    "allow_unconverged",
    "lds",
    "single_lds",
    "calibration",
)
# ...except, with a damping given by rule, the settings that decide it: for `auto` the retraining
# it is calibrated against and the calibration itself, for `heuristic` its fraction
CALIBRATION_SETTINGS = {
    "validate": ("pretrain_steps", "finetune_steps", "polish_iters", "polish_tol", "seed", "seeds", "batch_size", "lr"),
    "lds": ("fraction", "protocol", "seed"),
    "calibration": ("grid", "budget", "seed", "heuristic_fraction"),
}


def scored_config(cfg: Any) -> dict[str, Any]:
    """The part of the config that determines the scores (hashed into the results manifest)."""
    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else dict(cfg)
    out = {k: v for k, v in plain.items() if k not in NOT_HASHED}
    rules = {str((plain.get(stage) or {}).get("damping")) for stage in ("pretrain", "finetune")}
    if "auto" in rules:
        for key, fields in CALIBRATION_SETTINGS.items():
            section = plain.get(key) or {}
            out[key] = {f: section.get(f) for f in fields}
    elif "heuristic" in rules:
        out["calibration"] = {"heuristic_fraction": (plain.get("calibration") or {}).get("heuristic_fraction")}
    return out


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={name} but this machine has no CUDA device (torch.cuda.is_available() is False); "
            "use device=cpu or device=auto"
        )
    return device


def tristate(key: str, value: Any) -> bool | Literal["auto"]:
    """``auto`` | ``true`` | ``false`` (a str key: Hydra hands ``true`` over as ``"True"``)."""
    v = str(value).lower()
    if v not in ("auto", "true", "false"):
        raise ValueError(f"{key}={value!r}: use auto, true or false")
    return "auto" if v == "auto" else v == "true"


def check(cfg: Any) -> None:
    """Value checks the schema's types cannot express; fail before any training starts."""
    choices = {
        "mode": ("fixed", "updated"),
        "query": ("each", "mean"),
        "scoring": ("auto", "jvp", "grad"),
        "hvp": ("functional", "retained"),
    }
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ValueError(f"{key}={cfg[key]!r} is not one of {allowed}")
    if cfg.solver.name not in SOLVERS:
        raise ValueError(f"solver.name={cfg.solver.name!r} is not one of {SOLVERS}")
    for key in ("head_only", "exact_finetune"):
        tristate(key, cfg[key])
    if cfg.graph_budget_mib < 0:
        raise ValueError(f"graph_budget_mib={cfg.graph_budget_mib} must be >= 0")
    if cfg.query_chunk is not None and cfg.query_chunk < 1:
        raise ValueError(f"query_chunk={cfg.query_chunk} must be >= 1, or null for all queries in one solve")
    if cfg.solver.deflate < 0:
        raise ValueError(f"solver.deflate={cfg.solver.deflate} must be >= 0 (0: no deflation)")
    if cfg.solver.name == "lissa" and cfg.solver.scale != "auto":
        try:
            float(cfg.solver.scale)
        except ValueError:
            raise ValueError(f"solver.scale={cfg.solver.scale!r}: use 'auto' or a positive number") from None
    for stage in ("pretrain", "finetune"):
        try:
            check_damping(f"{stage}.damping", damping_value(cfg[stage].damping))
        except ValueError:
            raise ValueError(
                f"{stage}.damping={cfg[stage].damping!r}: use a finite number >= 0, auto (calibrated against "
                "retraining, calibration.*) or heuristic (a fraction of the mean eigenvalue)"
            ) from None
        n = cfg[stage].hessian_samples
        if n != "all" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{stage}.hessian_samples={n!r} must be a number >= 1 or 'all'")
    if cfg.test_points < 1:
        raise ValueError(f"test_points={cfg.test_points} must be >= 1")
    if not math.isfinite(cfg.alpha):
        raise ValueError(f"alpha={cfg.alpha} must be finite")
    if cfg.mode == "updated" and not cfg.alpha > 0:  # else it fails only after both stages trained
        raise ValueError(f"mode=updated needs alpha > 0 (the weight of alpha*||W - W*||^2), got alpha={cfg.alpha}")
    try:
        valid = cfg.device == "auto" or torch.device(cfg.device).type in ("cpu", "cuda")
    except RuntimeError:
        valid = False
    if not valid:
        raise ValueError(f"device={cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.shard_size < 1:
        raise ValueError(f"shard_size={cfg.shard_size} must be >= 1")
    _check_validate(cfg.validate)
    _check_calibration(cfg)


def damping_value(value: Any) -> Any:  # float | "auto" | "heuristic", checked by check()
    """A damping from the config: ``auto`` / ``heuristic``, or the number (YAML may hand ``1e-3`` over as a string)."""
    if isinstance(value, str) and value not in ("auto", "heuristic"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_calibration(cfg: Any) -> None:
    c = cfg.calibration
    bad = [g for g in c.grid if not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0)]
    if bad or len(c.grid) < 2:
        raise ValueError(f"calibration.grid={list(c.grid)}: give at least 2 dampings, each finite and > 0")
    if not (math.isfinite(c.heuristic_fraction) and c.heuristic_fraction > 0):
        raise ValueError(f"calibration.heuristic_fraction={c.heuristic_fraction} must be finite and > 0")
    auto = [stage for stage in ("pretrain", "finetune") if str(cfg[stage].damping) == "auto"]
    if not auto:
        return
    if c.budget < 3:
        raise ValueError(
            f"{auto[0]}.damping=auto with calibration.budget={c.budget}: the calibration needs at least 3 "
            "retrainings to measure agreement; raise calibration.budget, or use damping=heuristic (no retraining)"
        )
    v = cfg.validate
    if cfg.analysis.name != "lds" and v.pretrain_steps == 0 and v.finetune_steps == 0 and v.polish_iters == 0:
        raise ValueError(
            f"{auto[0]}.damping=auto calibrates against retraining, but validate.pretrain_steps, finetune_steps "
            "and polish_iters are all 0: nothing would be retrained. Give the retraining steps (validate.*), "
            "or use damping=heuristic or a number"
        )


def _check_validate(v: Any) -> None:
    # getattr on a config object by a key name (the old spelling): fail rather than validate another point
    if getattr(v, "test_index", None) is not None:
        new = "mean" if v.test_index < 0 else v.test_index
        raise ValueError(
            f"validate.test_index was replaced by validate.test_point: write validate.test_point={new} "
            "(or highest_loss, misclassified, random)"
        )
    point = str(v.test_point)
    if point not in ("highest_loss", "misclassified", "random", "mean") and not point.lstrip("-").isdigit():
        raise ValueError(
            f"validate.test_point={point!r} is not one of highest_loss, misclassified, random, mean or an index"
        )
    if v.seeds < 1:
        raise ValueError(f"validate.seeds={v.seeds} must be >= 1 (retraining seeds averaged per removal)")
    unknown = [b for b in v.baselines if b not in SOLVERS]
    if unknown:
        raise ValueError(f"validate.baselines has {unknown}; use solver names: {SOLVERS}")
    if v.batch_size is not None and v.batch_size < 1:
        raise ValueError(f"validate.batch_size={v.batch_size} must be >= 1 or null (the stage's train.batch_size)")
    if v.lr is not None and not v.lr > 0:
        raise ValueError(f"validate.lr={v.lr} must be > 0 or null (the stage's train.lr)")
    if v.enabled and v.num_examples < 3:  # a correlation of two points is always +-1
        raise ValueError(f"validate.num_examples={v.num_examples} must be >= 3 to measure a correlation")
