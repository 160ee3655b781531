"""Curvature-informed multi-task loss weights during fine-tuning (``finetune.curvature_weighting``).

Following New et al. (2022), a target whose loss is sharp (large top Hessian eigenvalue or
trace) takes a smaller loss weight, so it no longer dictates the step size the shared encoder
can take: every ``every`` epochs, after the validation pass, :class:`CurvatureWeighting`
re-estimates each target's curvature on a fixed small set of training batches and sets

    w_t ~ base_t x statistic_t^(-power),  normalised to mean 1, then clipped to [min_weight, max_weight]

into the model's ``loss_weight`` buffer, which :class:`finetune.train.PropertyTask` reads at
every step (``base_t``: the configured ``finetune.loss_weights``, 1 by default). The buffer is
saved in ``last.pt``, so a resumed run continues with the weights it had; the callback keeps no
other state. Each update is logged and appended to ``RUN/loss_weights.csv``.

The curvature is measured in the training dtype (float32) by double backprop (exact to ~1e-7
relative on every molmat model path; tests/test_curvature.py), over the trainable parameters,
with the model in eval mode; it draws no numbers from the global random generators, so the
training batches and dropout masks that follow are those of an unweighted run.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import curvature as C
from pipeline.config import CurvatureWeightingConfig
from pipeline.graphs import GraphBatch
from pipeline.training import Callback
from finetune.curvature import SetHVP, hvp_context, select_batches, set_losses

log = logging.getLogger("molmat.finetune")

#: File the weights are appended to, in the run directory.
WEIGHTS_CSV = "loss_weights.csv"
#: Curvature at or below this is taken as this (a flat or concave task gets the largest weight).
_TINY = 1e-12


def curvature_weights(statistic: np.ndarray, base: np.ndarray, power: float, min_weight: float,
                      max_weight: float) -> np.ndarray:
    """Loss weights from per-task curvature: ``base x statistic^(-power)``, mean 1, clipped.

    Args:
        statistic: (T,) top eigenvalue or trace per task (values <= 0 count as tiny).
        base: (T,) configured weights (multiplied in).
        power: exponent; 0 gives the base weights normalised.
        min_weight, max_weight: clip range, applied after normalising.
    Returns:
        (T,) float64 weights.
    """
    raw = base * np.maximum(statistic, _TINY) ** (-power)
    return np.clip(raw / raw.mean(), min_weight, max_weight)


class CurvatureWeighting(Callback):
    """Re-weights the per-target losses by their curvature every ``cfg.every`` epochs (see the module).

    Args:
        cfg: ``finetune.curvature_weighting``.
        train_set: the training records (``y`` reduced to the model's targets); the fixed batches
            are a seeded pick of ``cfg.batches x cfg.batch_size`` of them.
        loss_kind: the training loss (``mse``, ``l1``, ``huber``).
        seed: seeds the pick and the random vectors (``train.seed``).
    """

    def __init__(self, cfg: CurvatureWeightingConfig, train_set: Any, loss_kind: str, seed: int = 0) -> None:
        self.cfg, self.train_set, self.loss_kind, self.seed = cfg, train_set, loss_kind, seed
        self._batches: list[GraphBatch] | None = None

    def on_eval(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        """After the validation pass of every ``every``-th epoch: measure, set ``loss_weight``, log, append the CSV."""
        if (epoch + 1) % self.cfg.every:
            return
        model = trainer.raw_model
        if len(model.targets) < 2:
            return  # one task: its weight cancels in the weighted mean
        if self._batches is None:
            self._batches = [b.to(trainer.device) for b in select_batches(self.train_set, self.cfg.batches,
                                                                            self.cfg.batch_size, self.seed)]
        was_training = model.training
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        names = [s.name for s in model.targets]
        stat = np.full(len(names), np.nan)
        with hvp_context(trainer.device):
            losses = set_losses(model, self._batches, self.loss_kind, names)
            for j, name in enumerate(names):
                if name not in losses:
                    continue  # no label in the fixed set: keeps the neutral statistic below
                op = SetHVP(losses[name], params, "autograd")
                if self.cfg.statistic == "top":
                    stat[j] = float(C.lanczos(op, 1, self.cfg.iters, seed=self.seed, residuals=False).eigenvalues[0])
                else:
                    stat[j] = C.hutchinson_trace(op, self.cfg.iters, seed=self.seed)[0]
        model.train(was_training)
        known = np.isfinite(stat)
        if not known.any():
            return
        # a task without labels in the fixed set gets the geometric mean curvature (a neutral weight)
        filled = np.where(known, stat, np.exp(np.mean(np.log(np.maximum(stat[known], _TINY)))))
        base = np.array([s.weight for s in model.targets], dtype=np.float64)
        weights = curvature_weights(filled, base, self.cfg.power, self.cfg.min_weight, self.cfg.max_weight)
        new = torch.as_tensor(weights, dtype=model.loss_weight.dtype, device=model.loss_weight.device)
        if trainer.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank measured the same model on the same batches; rank 0's numbers make sure
            # no rounding difference leaves the ranks training different losses
            torch.distributed.broadcast(new, 0)
        with torch.no_grad():
            model.loss_weight.copy_(new)
        weights = new.double().cpu().numpy()
        if trainer.rank == 0:
            log.info("curvature weighting after epoch %d (%s): %s", epoch, self.cfg.statistic,
                     ", ".join(f"{n} {s:.4g} -> {w:.3f}" for n, s, w in zip(names, stat, weights)))
            self._append(Path(trainer.out) / WEIGHTS_CSV, epoch, trainer.state["step"], names, stat, weights)

    def _append(self, path: Path, epoch: int, step: int, names: list[str], stat: np.ndarray, weights: np.ndarray) -> None:
        row: dict[str, Any] = {"epoch": epoch, "step": step, "statistic": self.cfg.statistic}
        row.update({f"{self.cfg.statistic}_{n}": ("" if not math.isfinite(s) else s) for n, s in zip(names, stat)})
        row.update({f"weight_{n}": w for n, w in zip(names, weights)})
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
