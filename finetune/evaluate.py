"""``molmat evaluate``: metrics in physical units, a table of them, and parity plots for a trained model."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.metrics import target_metrics
from finetune.modeldata import default_eval_out, open_model_on_split, predict_loader
from pipeline import records as R
from pipeline.plots import parity_plot
from pipeline.readers import unit_column

__all__ = ["evaluate", "metrics_rows", "metrics_table", "parity_plot"]

#: Columns of ``metrics.csv``, one row per target (log10 columns empty for targets not learned as log10).
METRICS_COLUMNS = ("target", "unit", "mae", "rmse", "r2", "count", "log10_mae", "log10_rmse", "log10_r2")


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target of :data:`METRICS_COLUMNS` from :func:`evaluate`'s metrics dict."""
    rows = []
    for name, m in metrics["targets"].items():
        log10 = m.get("log10", {})
        rows.append({"target": name, "unit": m["unit"], "mae": m["mae"], "rmse": m["rmse"], "r2": m["r2"],
                     "count": m["count"], "log10_mae": log10.get("mae", ""), "log10_rmse": log10.get("rmse", ""),
                     "log10_r2": log10.get("r2", "")})
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value == "" or value is None:
        return ""
    return "nan" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of per-target MAE, RMSE and R^2 in physical units (log10 MAE for moduli)."""
    rows = metrics_rows(metrics)
    width = max([len("target")] + [len(r["target"]) for r in rows])
    unit_w = max([len("unit")] + [len(str(r["unit"])) for r in rows])
    has_log = any(r["log10_mae"] != "" for r in rows)
    head = f"{'target':<{width}}  {'unit':<{unit_w}}  {'MAE':>10}  {'RMSE':>10}  {'R2':>7}  {'n':>6}"
    lines = [head + ("  log10 MAE" if has_log else "")]
    for r in rows:
        line = (f"{r['target']:<{width}}  {r['unit']:<{unit_w}}  {_fmt(r['mae'], '10.4g')}  {_fmt(r['rmse'], '10.4g')}"
                f"  {_fmt(r['r2'], '7.3f')}  {r['count']:>6d}")
        if has_log:
            line += f"  {_fmt(r['log10_mae'], '9.4g')}"
        lines.append(line)
    for name, m in metrics["targets"].items():
        g = m.get("gate")
        if g:
            lines.append(f"{name}: zero/non-zero told apart for {100 * g['accuracy']:.1f}% ({g['true_zero']} true zeros, "
                         f"{g['predicted_zero']} predicted); MAE {g['mae_true_zero']:.4g} on true zeros, "
                         f"{g['mae_true_positive']:.4g} on the rest")
    return "\n".join(lines)


def evaluate(run: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             batch_size: int = 128, device: torch.device | str = "cpu", limit: int | None = None) -> dict[str, Any]:
    """Evaluate a model on a split of a shard directory (``all`` = every record; ``limit``: only
    the first N records of the split).

    A density model (``molmat-density-model``) goes to :func:`finetune.density.evaluate_density`
    (full-grid NMAE, electron counts, density slices; its metrics carry ``kind: density``).

    Writes into ``out`` (default :func:`finetune.modeldata.default_eval_out`): ``metrics.json`` (per target: MAE, RMSE,
    R^2, count in the target's unit; log10 targets also in log10), the same as a table in
    ``metrics.csv`` (:data:`METRICS_COLUMNS`), ``predictions.csv`` (record index, structure
    id, source file, then true and predicted value of every target, each column named with
    its unit, see :func:`pipeline.readers.unit_column`) and ``parity_<target>.png``. Returns
    the metrics dict.
    """
    from pipeline.checkpoint import DENSITY_MODEL, read_model_config

    if read_model_config(run)[1].get("format") == DENSITY_MODEL:
        # a density model is scored on full grids (finetune.density); its metrics say kind: density
        from finetune.density import evaluate_density

        return evaluate_density(run, data, split, out, device, limit=limit)
    scored = open_model_on_split(run, data, split, device, limit)
    model = scored.model
    res = predict_loader(model, scored.loader(batch_size), scored.device)
    # The loader keeps record order, so the split's records give each row's source file and its
    # labels as stored (float64): batches carry float32, which would print 0.0431 as 0.04309999942779541.
    records = [scored.dataset[i] for i in range(len(scored.dataset))]
    sources = [str(r[R.SOURCE]) for r in records]
    if records:
        res["y"] = np.stack([np.asarray(r[R.Y], dtype=np.float64) for r in records])
    out = Path(out) if out else default_eval_out(run, split)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"data": str(data), "split": split, "records": len(scored.dataset),
                               "targets": target_metrics(res, model.targets)}
    for j, spec in enumerate(model.targets):
        m = res["mask"][:, j]
        parity_plot(res["pred"][m, j], res["y"][m, j], spec.name, spec.unit, out / f"parity_{spec.name}.png",
                    log=spec.transform == "log10", metrics=metrics["targets"][spec.name])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(METRICS_COLUMNS))
        w.writeheader()
        w.writerows(metrics_rows(metrics))
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "id", "source"] + [unit_column(s.name, s.unit, f"_{k}") for s in model.targets
                                                for k in ("true", "pred")])
        for i in range(len(res["ids"])):
            row: list[Any] = [res["index"][i], res["ids"][i], sources[i]]
            for j in range(len(model.targets)):
                row += [repr(float(res["y"][i, j])) if res["mask"][i, j] else "", repr(float(res["pred"][i, j]))]
            w.writerow(row)
    return metrics
