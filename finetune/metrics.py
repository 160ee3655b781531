"""Regression metrics in physical units, shared by validation during training and ``molmat evaluate``."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.models.property import TargetSpec, labelled_mask


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R^2 and count of paired values (n,) and (n,)."""
    if len(y) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "count": 0}
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": float(1 - (err ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan"), "count": int(len(y))}


def _log10_flags(specs: Sequence[TargetSpec]) -> np.ndarray:
    return np.array([s.transform == "log10" for s in specs], dtype=bool)


def target_metrics(res: dict[str, np.ndarray], specs: Sequence[TargetSpec]) -> dict[str, dict[str, Any]]:
    """Per-target metrics of predictions against labels, in each target's unit.

    Args:
        res: ``pred`` and ``y`` (n, T) in physical units, ``mask`` (n, T) bool.
        specs: the targets.
    Returns:
        ``{name: {"unit", "mae", "rmse", "r2", "count"}}``, plus ``"log10": {...}`` for log10
        targets (over the positive labels).
    """
    usable = labelled_mask(res["y"], res["mask"], _log10_flags(specs))
    out: dict[str, dict[str, Any]] = {}
    for j, spec in enumerate(specs):
        m = res["mask"][:, j]
        entry: dict[str, Any] = {"unit": spec.unit, **regression_metrics(res["pred"][m, j], res["y"][m, j])}
        if spec.transform == "log10":
            pos = usable[:, j]
            entry["log10"] = regression_metrics(np.log10(res["pred"][pos, j]), np.log10(res["y"][pos, j]))
        if spec.gated and m.any():
            # how well the gate tells exact zeros (metals) from the rest, and the error on each side
            true_zero, pred_zero = res["y"][m, j] == 0, res["pred"][m, j] == 0
            entry["gate"] = {"accuracy": float((true_zero == pred_zero).mean()), "true_zero": int(true_zero.sum()),
                             "predicted_zero": int(pred_zero.sum()),
                             "mae_true_zero": float(np.abs(res["pred"][m, j][true_zero]).mean()) if true_zero.any() else float("nan"),
                             "mae_true_positive": float(np.abs(res["pred"][m, j] - res["y"][m, j])[~true_zero].mean())
                             if (~true_zero).any() else float("nan")}
        out[spec.name] = entry
    return out


def validation_metrics(res: dict[str, np.ndarray], specs: Sequence[TargetSpec], learned_std: np.ndarray) -> dict[str, float]:
    """What the trainer monitors: per-target MAE and their mean, each scaled by the target's spread.

    Args:
        res: as in :func:`target_metrics`.
        specs: the targets.
        learned_std: (T,) the model's normalisation std (the spread of log10 targets in log10).
    Returns:
        ``val_mae_<name>`` (``val_mae_log10_<name>`` for log10 targets) and ``val_mae_scaled``:
        the mean over targets of MAE / spread (the std of the validation labels; for log10
        targets the learned std), ``inf`` when no target has a label.
    """
    usable = labelled_mask(res["y"], res["mask"], _log10_flags(specs))
    metrics: dict[str, float] = {}
    scaled = []
    for j, spec in enumerate(specs):
        m = usable[:, j]
        if spec.transform == "log10":
            mae = float(np.abs(np.log10(res["pred"][m, j]) - np.log10(res["y"][m, j])).mean()) if m.any() else float("nan")
            metrics[f"val_mae_log10_{spec.name}"] = mae
            scale = float(learned_std[j])
        else:
            mae = float(np.abs(res["pred"][m, j] - res["y"][m, j]).mean()) if m.any() else float("nan")
            metrics[f"val_mae_{spec.name}"] = mae
            scale = float(np.std(res["y"][m, j])) if m.sum() > 1 else 1.0
        if np.isfinite(mae):
            scaled.append(mae / max(scale, 1e-12))
    metrics["val_mae_scaled"] = float(np.mean(scaled)) if scaled else float("inf")
    return metrics
