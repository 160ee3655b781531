"""Pictures people look at: learning curves of every training run and parity plots of evaluations.

Both are drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global backend
switch in a user's process and no GUI), imported only when a picture is drawn, and written
atomically (a temporary file renamed over the old picture), so a viewer refreshing the file
never sees half an image.

* :class:`LearningCurveCallback`, which the trainer adds on rank 0 for every stage, redraws
  ``RUN/learning_curve.png`` from ``RUN/metrics.csv`` after each epoch (skipping redraws that
  would make pictures more than a small part of a run of very short epochs) and when training
  ends (:func:`plot_learning_curve`). The panels follow the columns present, never the stage: losses
  (``train_loss``, ``val_loss``, per-target ``train_loss_<t>``), the monitored metric with its
  best epoch marked, any ``*accuracy`` column (pretraining's contrastive accuracy), and ``lr``.
* :func:`parity_plot`: predicted against true values, a scatter up to :data:`HEXBIN_ABOVE`
  points and a hexagonal density map above (a scatter of thousands of points is one blot).
* :func:`spectral_density_plot` and :func:`curvature_comparison_plot`: Hessian spectral densities
  of ``molmat curvature`` (one task, and all tasks on one axis), on a symmetric-log eigenvalue axis.
* :func:`density_slice_plot`: true, predicted and error electron density on a plane through a
  structure (``molmat evaluate`` of a density model).
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.training import Callback

log = logging.getLogger("molmat.plots")

#: File name of the learning curve in a run directory.
LEARNING_CURVE = "learning_curve.png"
#: Parity plots with more points than this are drawn as a hexbin density map.
HEXBIN_ABOVE = 2000


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib Figure on its own Agg canvas (no pyplot state), and the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, FigureCanvasAgg(fig)


def _save_atomic(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a ``metrics.csv`` as float arrays (empty cells and text as NaN), by column name."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            try:
                values.append(float(row.get(key) or "nan"))
            except ValueError:
                values.append(math.nan)
    return {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}


def _log_if_positive(ax: Any, *series: np.ndarray) -> None:
    """Log y axis when every finite value shown is positive (losses spanning decades)."""
    values = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.zeros(0)
    if values.size and (values > 0).all():
        ax.set_yscale("log")


def plot_learning_curve(metrics_csv: str | Path, out: str | Path, monitor: str | None = None) -> list[str]:
    """Draw the learning curve of a training run from its ``metrics.csv``.

    Args:
        metrics_csv: the run's per-epoch metrics (one row per epoch, an ``epoch`` column).
        out: PNG to write (replaced atomically).
        monitor: the validation metric the run minimises (its best epoch is marked).
    Returns:
        The panels drawn, left to right, some of ``loss``, ``monitor`` (when the monitored metric
        is not already a loss), ``accuracy``, ``lr``; empty (and nothing written) when the CSV
        has no rows yet.
    """
    cols = read_metrics(metrics_csv)
    epoch = cols.get("epoch")
    if epoch is None or epoch.size == 0:
        return []
    losses = [k for k in ("train_loss", "val_loss") if k in cols]
    per_target = sorted(k for k in cols if k.startswith("train_loss_"))[:8]
    accuracy = sorted(k for k in cols if k.endswith("accuracy"))
    panels: list[str] = []
    if losses or per_target:
        panels.append("loss")
    if monitor and monitor in cols and monitor not in losses:
        panels.append("monitor")
    if accuracy:
        panels.append("accuracy")
    if "lr" in cols:
        panels.append("lr")
    fig, _ = _figure(4.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if panel == "loss":
            for k in losses:
                ax.plot(epoch, cols[k], marker="o", ms=2.5, lw=1.4, label=k)
            for k in per_target:
                ax.plot(epoch, cols[k], lw=0.8, ls="--", alpha=0.7, label=k[len("train_"):])
            _log_if_positive(ax, *[cols[k] for k in losses + per_target])
            ax.set_title("loss")
        elif panel == "monitor":
            ax.plot(epoch, cols[monitor], marker="o", ms=2.5, lw=1.4, color="C2", label=monitor)
            _log_if_positive(ax, cols[monitor])
            ax.set_title(f"validation: {monitor}")
        elif panel == "accuracy":
            for k in accuracy:
                ax.plot(epoch, cols[k], marker="o", ms=2.5, lw=1.4, label=k)
            ax.set_ylim(0, 1.02)
            ax.set_title("contrastive accuracy" if any("val_" in k for k in accuracy) else "accuracy")
        else:
            ax.plot(epoch, cols["lr"], lw=1.4, color="C3")
            _log_if_positive(ax, cols["lr"])
            ax.set_title("learning rate")
        if panel == ("loss" if monitor in losses else "monitor"):
            values = cols[monitor]
            if np.isfinite(values).any():
                best = int(np.nanargmin(values))
                ax.plot([epoch[best]], [values[best]], marker="*", ms=11, color="k", ls="none",
                        label=f"best {values[best]:.4g} (epoch {int(epoch[best])})")
        if panel != "lr":
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save_atomic(fig, Path(out))
    return panels


class LearningCurveCallback(Callback):
    """Keeps ``RUN/learning_curve.png`` up to date while a run trains (rank 0; the trainer adds it).

    The picture is redrawn from ``metrics.csv`` when the trainer writes ``last.pt`` after an
    epoch, i.e. just after the epoch's row was appended, and once more when training ends. A
    drawing takes 0.2-0.7 s on a busy CPU, which is much of a short epoch: after the first
    epoch, a redraw is skipped until the time since the last one is ``budget`` times what it
    cost, so pictures take at most about 1/``budget`` of a run (every epoch of a run whose epochs
    take longer than that). Drawing happens inside the trainer's save window, so ``timing.json``
    counts it with the checkpoint seconds, not as training. A failure to draw is logged once and
    never stops training.

    Args:
        budget: minimum ratio of time between redraws to the cost of the last one.
    """

    def __init__(self, budget: float = 20.0) -> None:
        self.budget = budget
        self._drawn_size = -1     # bytes of metrics.csv when last drawn
        self._last_end = -math.inf
        self._last_cost = 0.0
        self._warned = False

    def _draw(self, trainer: Any, force: bool) -> None:
        path = trainer.out / "metrics.csv"
        try:
            size = path.stat().st_size if path.exists() else 0
            if size == self._drawn_size:  # nothing new (a stop signal saves again without a new row)
                return
            now = time.perf_counter()
            if not force and now - self._last_end < self.budget * self._last_cost:
                return
            plot_learning_curve(path, trainer.out / LEARNING_CURVE, getattr(trainer.task, "monitor", None))
            self._drawn_size = size
            self._last_end = time.perf_counter()
            self._last_cost = self._last_end - now
        except Exception as exc:  # a picture must never end a training run
            if not self._warned:
                log.warning("could not draw %s (%s: %s); training goes on", trainer.out / LEARNING_CURVE,
                            type(exc).__name__, exc)
                self._warned = True

    def on_save_start(self, trainer: Any, what: str) -> None:
        """After an epoch (``what == "last"``): redraw if metrics.csv grew and the time budget allows."""
        if what == "last":
            self._draw(trainer, force=False)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        """Draw the final curve (every epoch), whatever was skipped before."""
        self._draw(trainer, force=True)


def parity_plot(pred: np.ndarray, y: np.ndarray, name: str, unit: str, path: str | Path, log: bool = False,
                metrics: dict[str, float] | None = None) -> str:
    """Predicted against true values with the y = x line, written as PNG.

    Args:
        pred, y: (n,) predictions and labels in the target's unit.
        name, unit: the target, for the axis labels.
        path: PNG to write (replaced atomically).
        log: log axes (moduli); non-positive values are left out of a log plot.
        metrics: ``mae``, ``r2``, ``count`` for the title.
    Returns:
        ``"scatter"``, or ``"hexbin"`` when there are more than :data:`HEXBIN_ABOVE` points (a
        density map, counts on a log colour scale, so the structure under the diagonal shows).
    """
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(pred) & np.isfinite(y)
    if log:
        keep &= (pred > 0) & (y > 0)
    pred, y = pred[keep], y[keep]
    fig, _ = _figure(4.8, 4.4)
    ax = fig.subplots()
    kind = "hexbin" if len(y) > HEXBIN_ABOVE else "scatter"
    if kind == "hexbin":
        scale = "log" if log else "linear"
        hb = ax.hexbin(y, pred, gridsize=60, bins="log", mincnt=1, cmap="viridis", xscale=scale, yscale=scale)
        fig.colorbar(hb, ax=ax, label="structures per bin")
    else:
        ax.scatter(y, pred, s=8, alpha=0.6, edgecolors="none")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
    if len(y):
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xlabel(f"true {name} [{unit}]")
    ax.set_ylabel(f"predicted {name} [{unit}]")
    if metrics:
        ax.set_title(f"MAE {metrics['mae']:.4g} {unit}, R$^2$ {metrics['r2']:.3f}, n={metrics['count']}", fontsize=9)
    fig.tight_layout()
    _save_atomic(fig, Path(path))
    return kind


# ------------------------------------------------------------------------- Hessian spectra
#: Points of the grid a broadened spectral density is drawn on.
DENSITY_GRID = 4000
#: Densities below this fraction of a curve's peak are not drawn (the log axis would reach 1e-300).
DENSITY_FLOOR = 1e-7


def _broadened(nodes: Any, weights: Any, sigma_rel: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A quadrature's density on a linear grid: (grid (G,), density (G,), absolute sigma).

    ``sigma = sigma_rel x`` the nodes' range (or of their magnitude when all nodes coincide);
    the grid reaches 5 sigma past the extreme nodes, with about 40 points per sigma at the default
    relative width of 0.01.
    """
    import torch

    from pipeline.curvature import broadened_density

    nodes_t = torch.as_tensor(np.asarray(nodes, dtype=np.float64))
    weights_t = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    span = hi - lo if hi > lo else max(abs(hi), 1e-12)
    sigma = sigma_rel * span
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, DENSITY_GRID, dtype=torch.float64)
    return grid.numpy(), broadened_density(nodes_t, weights_t, grid, sigma).numpy(), sigma


def _symlog_axis(ax: Any, linthresh: float) -> None:
    # a power of ten, so the decade ticks fall on the linear part's ends, not inside it; each
    # half of the linear part as wide as a decade, so the ticks at 0 and +-linthresh do not collide
    linthresh = 10.0 ** round(math.log10(linthresh)) if linthresh > 0 else 1e-12
    ax.set_xscale("symlog", linthresh=linthresh, linscale=1.0)
    ax.axvline(0.0, color="0.6", lw=0.6, zorder=0)


def _show_density(ax: Any, grid: np.ndarray, density: np.ndarray, **kw: Any) -> Any:
    shown = np.where(density > density.max() * DENSITY_FLOOR, density, np.nan)
    return ax.plot(grid, shown, **kw)[0]


def spectral_density_plot(nodes: Any, weights: Any, top: Any, name: str, path: str | Path, sigma_rel: float = 0.01,
                          trace: float | None = None) -> float:
    """The broadened Hessian spectral density of one task's loss, top eigenvalues marked, as PNG.

    The eigenvalue axis is symmetric-logarithmic (linear within the broadening width of zero,
    logarithmic beyond, both signs), since a network's Hessian spectrum is a huge bulk near zero
    with a few outliers decades away; the density axis is logarithmic.

    Args:
        nodes, weights: (S, m) stochastic Lanczos quadrature from :func:`pipeline.curvature.slq_density`.
        top: (k,) top eigenvalues (Lanczos), drawn as vertical lines.
        name: the task, for the title. path: PNG to write (replaced atomically).
        sigma_rel: Gaussian broadening relative to the nodes' range.
        trace: Hutchinson trace, for the title.
    Returns:
        The absolute broadening width used.
    """
    grid, density, sigma = _broadened(nodes, weights, sigma_rel)
    top = np.asarray(top, dtype=np.float64)
    fig, _ = _figure(5.6, 3.8)
    ax = fig.subplots()
    _show_density(ax, grid, density, color="C0", lw=1.3, label="density (SLQ)")
    for i, lam in enumerate(top):
        ax.axvline(lam, color="C3", lw=0.9, ls="--", alpha=0.8, label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_yscale("log")
    _symlog_axis(ax, sigma)
    ax.set_xlabel("Hessian eigenvalue $\\lambda$ (symlog)")
    ax.set_ylabel("spectral density")
    title = f"{name}: $\\lambda_{{max}}$ = {top[0]:.4g}" if top.size else name
    if trace is not None and math.isfinite(trace):
        title += f", trace = {trace:.4g}"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_atomic(fig, Path(path))
    return sigma


def curvature_comparison_plot(spectra: dict[str, tuple[Any, Any, Any, float]], path: str | Path,
                              sigma_rel: float = 0.01) -> list[str]:
    """Every task's Hessian spectral density on one symlog axis, sharpest first in the legend, as PNG.

    Each curve has its own broadening (``sigma_rel`` of its own range), so a narrow spectrum is
    not smeared by a wide one; each task's top eigenvalue is marked by a short tick in its colour
    at the top of the axis.

    Args:
        spectra: per task name, (nodes (S, m), weights (S, m), top eigenvalues (k,), trace).
        path: PNG to write (replaced atomically).
        sigma_rel: broadening relative to each curve's range.
    Returns:
        The task names in legend order (descending top eigenvalue).
    """
    order = sorted(spectra, key=lambda t: -float(np.asarray(spectra[t][2], dtype=np.float64)[0]))
    fig, _ = _figure(6.4, 4.2)
    ax = fig.subplots()
    sigmas = []
    for i, task in enumerate(order):
        nodes, weights, top, trace = spectra[task]
        grid, density, sigma = _broadened(nodes, weights, sigma_rel)
        sigmas.append(sigma)
        lam = float(np.asarray(top, dtype=np.float64)[0])
        tr = f", tr {trace:.3g}" if trace is not None and math.isfinite(trace) else ""
        line = _show_density(ax, grid, density, color=f"C{i % 10}", lw=1.3, label=f"{task}: $\\lambda_{{max}}$ {lam:.3g}{tr}")
        ax.axvline(lam, ymin=0.93, ymax=1.0, color=line.get_color(), lw=2.0)
    ax.set_yscale("log")
    _symlog_axis(ax, min(sigmas) if sigmas else 1e-6)
    ax.set_xlabel("Hessian eigenvalue $\\lambda$ (symlog)")
    ax.set_ylabel("spectral density")
    ax.set_title("loss curvature per task (ticks: top eigenvalue)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save_atomic(fig, Path(path))
    return order


# --------------------------------------------------------------------------- density slices
#: Lowest density (e/bohr^3) on the log colour scale of density slices; the vacuum below is one colour.
SLICE_FLOOR = 1e-4


def density_slice_plot(true: np.ndarray, pred: np.ndarray, extent: tuple[float, float, float, float],
                       path: str | Path, atoms: np.ndarray | None = None, labels: list[str] | None = None,
                       title: str = "") -> Path:
    """True, predicted and error density on a plane, three panels side by side, as PNG.

    Args:
        true, pred: (H, W) density (e/bohr^3) on the plane, row 0 at the bottom; NaN where the true
            density is unknown (outside the grid): drawn blank.
        extent: (u_min, u_max, v_min, v_max) of the plane coordinates, Angstrom.
        path: PNG to write (replaced atomically).
        atoms: (A, 2) in-plane coordinates (Angstrom) of the atoms to mark; labels: their symbols.
        title: a line above the panels (structure, NMAE).
    Returns:
        The path written. True and predicted share a log colour scale from :data:`SLICE_FLOOR` to
        the larger maximum; the error (predicted - true) a symmetric log scale (linear within
        :data:`SLICE_FLOOR` of zero) to its largest magnitude, so errors in bonds (1e-3..1e-2) and at
        nuclei (up to 1e1) both show.
    """
    from matplotlib.colors import LogNorm, SymLogNorm

    true, pred = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    err = pred - true
    top = max(float(np.nanmax(true)) if np.isfinite(true).any() else 1.0, float(np.nanmax(pred)), SLICE_FLOOR * 10)
    norm = LogNorm(vmin=SLICE_FLOOR, vmax=top)
    lim = float(np.nanmax(np.abs(err))) if np.isfinite(err).any() else 1.0
    fig, _ = _figure(13.5, 4.3)
    axes = fig.subplots(1, 3)
    panels = [("true", np.clip(true, SLICE_FLOOR, None), {"norm": norm, "cmap": "viridis"}),
              ("predicted", np.clip(pred, SLICE_FLOOR, None), {"norm": norm, "cmap": "viridis"}),
              ("predicted - true", err, {"norm": SymLogNorm(linthresh=SLICE_FLOOR, vmin=-max(lim, 10 * SLICE_FLOOR),
                                                            vmax=max(lim, 10 * SLICE_FLOOR)), "cmap": "RdBu_r"})]
    for ax, (name, data, style) in zip(axes, panels):
        im = ax.imshow(np.ma.masked_invalid(data), origin="lower", extent=extent, interpolation="nearest", **style)
        fig.colorbar(im, ax=ax, shrink=0.85, label="e/bohr$^3$")
        if atoms is not None and len(atoms):
            ax.scatter(atoms[:, 0], atoms[:, 1], s=14, facecolors="none", edgecolors="k", linewidths=0.8)
            for (x, y), label in zip(atoms, labels or []):
                ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("u [A]")
        ax.set_ylabel("v [A]")
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_atomic(fig, Path(path))
