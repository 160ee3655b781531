"""``molmat evaluate``: metrics in physical units and parity plots for a trained model."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.metrics import target_metrics
from finetune.modeldata import open_model_on_split, predict_loader


def parity_plot(pred: np.ndarray, y: np.ndarray, name: str, unit: str, path: Path, log: bool = False,
                metrics: dict[str, float] | None = None) -> None:
    """Predicted vs true scatter with the y = x line, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    ax.scatter(y, pred, s=8, alpha=0.6, edgecolors="none")
    if len(y):
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"true {name} [{unit}]")
    ax.set_ylabel(f"predicted {name} [{unit}]")
    if metrics:
        ax.set_title(f"MAE {metrics['mae']:.4g} {unit}, R$^2$ {metrics['r2']:.3f}, n={metrics['count']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(run: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             batch_size: int = 128, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Evaluate a model on a split of a shard directory (``all`` = every record).

    Writes ``metrics.json`` (per target: MAE, RMSE, R^2, count in the target's unit; log10 targets
    also in log10), ``predictions.csv`` and ``parity_<target>.png`` into ``out``
    (default ``RUN/eval_<split>``). Returns the metrics dict.
    """
    scored = open_model_on_split(run, data, split, device)
    model = scored.model
    res = predict_loader(model, scored.loader(batch_size), scored.device)
    out = Path(out) if out else Path(run) / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"data": str(data), "split": split, "records": len(scored.dataset),
                               "targets": target_metrics(res, model.targets)}
    for j, spec in enumerate(model.targets):
        m = res["mask"][:, j]
        parity_plot(res["pred"][m, j], res["y"][m, j], spec.name, spec.unit, out / f"parity_{spec.name}.png",
                    log=spec.transform == "log10", metrics=metrics["targets"][spec.name])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "id"] + [f"{s.name}_{k}" for s in model.targets for k in ("true", "pred")])
        for i in range(len(res["ids"])):
            row: list[Any] = [res["index"][i], res["ids"][i]]
            for j in range(len(model.targets)):
                row += [repr(float(res["y"][i, j])) if res["mask"][i, j] else "", repr(float(res["pred"][i, j]))]
            w.writerow(row)
    return metrics
