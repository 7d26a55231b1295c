"""Retraining without some pretraining examples, cached: the ground truth of leave-one-out and the LDS.

A :class:`Retrainer` retrains the pretraining stage with weight 0 on the removed examples
(:func:`.training.leave_out`; the objective keeps its ``1/m``), then the finetuning stage
on the retrained embedding, and caches each stage's model under ``cache_dir/<folder>/`` by
a key of the kept indices and every setting the model depends on (the full-data model's
cache key, the retraining settings, the protocol, the mode and alpha, and the seed where
it matters), written atomically as soon as it is trained: a rerun, another variant or a
killed run retrains nothing that exists (docs/validation.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config
from .data import TwoStageData
from .models import ModelConfig, TwoStageNet, build_from_config, embedding_state, finetune_model_from
from .training import TrainConfig, TrainReport, _load_cached, _save_cached, finetune, leave_out, pretrain, settings_key

CACHE_VERSION = 1  # bump when the retraining changes meaning, so old models are ignored
PROTOCOLS = ("warm", "scratch")


def retrain_settings(cfg: Any) -> tuple[TrainConfig, TrainConfig]:
    """The stages' training settings with the validation's step counts, seed, and (where
    given) minibatch size and learning rate (``validate.*``)."""
    v = cfg.validate
    pre = config.to_frozen(TrainConfig, cfg.pretrain.train)
    ft = config.to_frozen(TrainConfig, cfg.finetune.train)
    common: dict[str, Any] = dict(polish_iters=v.polish_iters, polish_tol=v.polish_tol, seed=v.seed)
    for key in ("batch_size", "lr"):  # getattr on a config object, by key name: not contract probing
        if getattr(v, key, None) is not None:
            common[key] = getattr(v, key)
    return replace(pre, steps=v.pretrain_steps, **common), replace(ft, steps=v.finetune_steps, **common)


def removed(m: int, keep: torch.Tensor) -> torch.Tensor:
    """The indices of ``0..m-1`` not in ``keep``."""
    mask = torch.ones(m, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def without(m: int, drop: int) -> torch.Tensor:
    """The kept indices when example ``drop`` of ``m`` is left out."""
    keep = torch.arange(m)
    return keep[keep != drop]


def _digest(keep: torch.Tensor) -> str:
    return hashlib.sha256(np.asarray(keep, dtype=np.int64).tobytes()).hexdigest()[:20]


def _seed_matters(cfg: TrainConfig, n: int) -> bool:
    # Full-batch Adam and L-BFGS draw nothing at random: the training seed only orders minibatches.
    return cfg.batch_size is not None and cfg.batch_size < n


class Retrainer:
    """Retrains (or loads from the cache) one subset's pretrained and finetuned models.

    Args:
        cfg: the run's config (model, training, ``validate.*``, ``alpha``, ``cache_dir``).
        data: the two stages' data.
        pretrained: the full-data pretrained model (the warm start, and the template).
        pretrain_key: its weight-cache key (data, model and training: what warm starts from).
        seed: the retraining seed (minibatch order; the initialisation under ``scratch``).
        protocol: ``warm`` (from the trained weights, :func:`retrain_settings`) or
            ``scratch`` (a fresh initialisation, the stages' own training settings).
        folder: the cache's subfolder of ``cache_dir`` (``lds``, ``loo``).
    """

    def __init__(
        self,
        cfg: Any,
        data: TwoStageData,
        pretrained: TwoStageNet,
        pretrain_key: str,
        seed: int,
        protocol: str = "warm",
        folder: str = "lds",
    ):
        self.cfg, self.data, self.pretrained, self.seed = cfg, data, pretrained, seed
        self.protocol = protocol
        self.m = len(data.pretrain_train)
        self.cache = Path(cfg.cache_dir).expanduser() / folder
        self.device = next(pretrained.parameters()).device
        self.model_cfg = replace(config.to_frozen(ModelConfig, cfg.model), seed=seed)
        if self.protocol == "warm":
            pre, ft = retrain_settings(cfg)
        else:
            pre = config.to_frozen(TrainConfig, cfg.pretrain.train)
            ft = config.to_frozen(TrainConfig, cfg.finetune.train)
        self.pre_cfg, self.ft_cfg = replace(pre, seed=seed), replace(ft, seed=seed)
        self.pretrain_key = pretrain_key
        self.reports: list[TrainReport] = []  # of every model used, cached or trained
        self.trained = 0

    @property
    def seed_matters(self) -> bool:
        """Whether the retraining draws anything from its seed (else every seed gives one model)."""
        n_ft = len(self.data.finetune_train)
        return self.protocol == "scratch" or _seed_matters(self.pre_cfg, self.m) or _seed_matters(self.ft_cfg, n_ft)

    def _train_settings(self, train: TrainConfig, n: int) -> dict:
        # A seed that changes nothing is left out of the key, so seed-free protocols share models.
        settings = asdict(train)
        if self.protocol == "warm" and not _seed_matters(train, n):
            settings["seed"] = None
        return settings

    def pretrain_settings(self, keep: torch.Tensor) -> dict:
        settings = {
            "lds": CACHE_VERSION,
            "stage": "pretrain",
            "protocol": self.protocol,
            "base": self.pretrain_key,  # data, model and the full-data training: what warm starts from
            "kept": _digest(keep),
            "train": self._train_settings(self.pre_cfg, self.m),
            "model_seed": self.seed if self.protocol == "scratch" else None,
        }
        if self.device.type != "cpu":
            settings["device"] = self.device.type
        return settings

    def finetune_settings(self, pre_key: str, finetune_key: str, mode: str) -> dict:
        return {
            "lds": CACHE_VERSION,
            "stage": "finetune",
            "pretrain": pre_key,
            "base": finetune_key,
            "train": self._train_settings(self.ft_cfg, len(self.data.finetune_train)),
            "mode": mode,
            "alpha": float(self.cfg.alpha) if mode == "updated" else None,
        }

    def _path(self, settings: dict) -> Path:
        return self.cache / f"{settings['stage']}_{settings_key(settings)}.pt"

    def is_cached(self, keep: torch.Tensor, finetune_key: str, mode: str) -> bool:
        pre_key = settings_key(self.pretrain_settings(keep))
        return self._path(self.finetune_settings(pre_key, finetune_key, mode)).is_file()

    def pretrained_on(self, keep: torch.Tensor) -> tuple[TwoStageNet, str]:
        settings = self.pretrain_settings(keep)
        path = self._path(settings)
        hit = _load_cached(path, self.pretrained)
        if hit is not None:
            self.reports.append(hit[1])
            return hit[0], settings_key(settings)
        weights = leave_out(self.m, removed(self.m, keep).tolist(), dtype=next(self.pretrained.parameters()).dtype)
        if self.protocol == "warm":
            start = self.pretrained
        else:
            start = build_from_config(self.model_cfg, len(self.data.pretrain_classes)).to(self.device)
        model, report = pretrain(start, self.data, self.pre_cfg, weights=weights)
        self.reports.append(report)
        self.trained += 1
        _save_cached(path, model, report, settings)
        return model, settings_key(settings)

    def finetuned_on(
        self, pre: TwoStageNet, pre_key: str, finetuned: TwoStageNet, finetune_key: str, mode: str
    ) -> TwoStageNet:
        settings = self.finetune_settings(pre_key, finetune_key, mode)
        path = self._path(settings)
        hit = _load_cached(path, finetuned)
        if hit is not None:
            self.reports.append(hit[1])
            return hit[0]
        if self.protocol == "warm":
            start = finetuned
        else:
            start = finetune_model_from(pre, len(self.data.finetune_classes), self.seed)
        model, report = finetune(start, self.data, self.ft_cfg, mode, self.cfg.alpha, embedding_state(pre))
        self.reports.append(report)
        self.trained += 1
        _save_cached(path, model, report, settings)
        return model
