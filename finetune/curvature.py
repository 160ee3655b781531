"""``molmat curvature``: the Hessian spectrum of each target's training loss of a trained model.

Curvature-informed multi-task learning (New et al. 2022) compares the loss landscapes of the
tasks a model learns together: a task whose loss is much sharper (larger top Hessian eigenvalue,
larger trace) than the others dominates the shared encoder's gradient steps and limits the
learning rate the others can use. This module measures, for each target of a property model
and for the weighted total the trainer minimises:

* the top eigenvalues (Lanczos, with residuals), the trace (Hutchinson, with its standard
  error), the spectral density (stochastic Lanczos quadrature), the fraction of negative
  curvature, and the level-spacing ratio of the top Ritz values;
* on one fixed, seeded set of structures of a split (the same for every target), with the
  model in eval mode, optionally converted to float64;
* over all parameters, the encoders only, or the heads (and gates) only.

The numerics are :mod:`pipeline.curvature`. The loss of a target over the set is the mean of
its per-structure training loss over the set's labelled structures: the per-batch losses of
:func:`finetune.losses.property_losses` weighted by their labelled counts; ``total`` is the
trainer's per-batch :func:`finetune.losses.weighted_total` averaged over the batches (weighted by
their sizes). Hessian-vector products are accumulated batch by batch (``H v = sum_b w_b H_b v``),
so memory is that of one batch's double backward, whatever the size of the set.

Writes ``OUT/curvature.json`` and the pictures of :func:`pipeline.plots.spectral_density_plot`
(one per target) and :func:`pipeline.plots.curvature_comparison_plot` (all on one axis).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import MolmatError, __version__
from pipeline import curvature as C
from pipeline.checkpoint import PROPERTY_MODEL
from pipeline.config import CurvatureConfig
from pipeline.graphs import GraphBatch, collate
from pipeline.models.property import PropertyModel
from finetune.losses import property_losses, weighted_total
from finetune.modeldata import open_model_on_split

log = logging.getLogger("molmat.curvature")

#: Name of the weighted-total "task" (the loss training minimises).
TOTAL = "total"
#: Parameter groups the Hessian can be taken over.
PARAM_GROUPS = ("all", "encoder", "heads")
#: Largest relative difference between double-backprop and finite-difference HVPs for which
#: ``hvp: auto`` trusts double backprop. In float64 finite differences are good to ~1e-8 on
#: molmat's models (tests/test_curvature.py), so 1e-4 separates a correct double backward from a
#: wrong one; in float32 finite differences themselves are off by up to ~6e-4, while a wrong
#: double backward is off by > 1e-2.
HVP_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-2}
#: Eigenvalues below ``-NEGATIVE_BEYOND x`` the top eigenvalue count as significantly negative. A
#: network's spectrum is a bulk at zero holding nearly all the mass; its quadrature node falls on
#: either side of zero by rounding (measured: 99.6% of the mass at |lambda| < 1e-3 lambda_max on a
#: QM9 MPNN, counted negative for one target and positive for the next), which the raw negative
#: mass reports as 0 or 1.
NEGATIVE_BEYOND = 1e-3
#: File names in the output directory.
JSON_NAME = "curvature.json"
COMPARISON_PNG = "curvature_comparison.png"


# ------------------------------------------------------------------------------------ batches
def batch_to_dtype(batch: GraphBatch, dtype: torch.dtype) -> GraphBatch:
    """Cast a batch's floating tensors to ``dtype``, in place, and return it.

    The floating tensors of a :class:`GraphBatch` are ``cell`` (B, 3, 3), ``y`` (B, T), and the
    floating node and edge data of its graphs: ``g2d.ndata["x"]`` (N, ATOM_DIM),
    ``g2d.edata["e"]`` (E, BOND_DIM), ``g3d.ndata["pos"]`` (N, 3), ``g3d.edata["image"]``
    (E, 3). Integer data (``z``, ``n_atoms``, ``mask``) is left alone. A float64 model needs
    float64 inputs: the MPNN's first Linear refuses float32, and SchNet would silently compute
    distances in float32. The graphs are changed in place (a collated batch owns them).
    """
    for g in (batch.g2d, batch.g3d):
        if g is None:
            continue
        for data in (g.ndata, g.edata):
            for key in list(data.keys()):  # DGL's .items() gives storage columns, not tensors
                if data[key].is_floating_point():
                    data[key] = data[key].to(dtype)
    batch.cell = batch.cell.to(dtype)
    batch.y = batch.y.to(dtype)
    return batch


def select_batches(dataset: Any, batches: int, batch_size: int, seed: int) -> list[GraphBatch]:
    """A seeded pick of ``min(batches x batch_size, len(dataset))`` records, collated in batches.

    The pick depends only on (dataset length, seed), so every task, parameter group and rerun
    sees the same structures; records are read in index order (shards are read sequentially).

    Returns:
        Up to ``batches`` CPU batches of ``batch_size`` records (the last may be smaller).
    """
    n = min(batches * batch_size, len(dataset))
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return [collate([dataset[int(i)] for i in pick[s:s + batch_size]]) for s in range(0, n, batch_size)]


def parameter_group(model: PropertyModel, name: str) -> list[nn.Parameter]:
    """The parameters of a group: ``all``, ``encoder`` (of ``model.encoders()``) or ``heads`` (heads and gates).

    Raises:
        MolmatError: an unknown group name.
    """
    if name == "all":
        return list(model.parameters())
    if name == "encoder":
        return [p for e in model.encoders() for p in e.parameters()]
    if name == "heads":
        return list(model.heads.parameters()) + list(model.gates.parameters())
    raise MolmatError(f"unknown parameter group {name!r}; expected one of {', '.join(PARAM_GROUPS)}")


@contextlib.contextmanager
def hvp_context(device: torch.device) -> Iterator[None]:
    """Where double backprop works on ``device``: cuDNN off on a GPU.

    cuDNN's LSTM (the MPNN's Set2Set readout) has no double backward (pytorch/pytorch#25315);
    with cuDNN disabled PyTorch's native LSTM is used, which has one.
    """
    if device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


# -------------------------------------------------------------------------------- set losses
class SetLoss:
    """One task's loss over a fixed set of batches, as per-batch closures with weights.

    The loss over the set is ``sum_b weights[b] * closures[b]()``.

    Attributes:
        name: the target's name, or :data:`TOTAL`.
        closures: zero-argument closures, each the task's scalar loss on one batch.
        weights: (len(closures),) floats summing to 1.
        labelled: structures in the set labelled for the task (for ``total``: all structures).
        value: the loss over the set at the current parameters.
    """

    def __init__(self, name: str, closures: list[C.LossFn], weights: list[float], labelled: int, value: float) -> None:
        self.name, self.closures, self.weights, self.labelled, self.value = name, closures, weights, labelled, value

    def __call__(self) -> Tensor:
        """The scalar loss over the whole set in one graph (memory of every batch at once; for small sets)."""
        return sum(w * f() for w, f in zip(self.weights, self.closures))


def set_losses(model: PropertyModel, batches: Sequence[GraphBatch], kind: str,
               tasks: Sequence[str]) -> dict[str, SetLoss]:
    """Build each task's :class:`SetLoss` on batches already on the model's device and dtype.

    Args:
        model: the property model (its ``loss_weight`` buffer weights ``total``).
        batches: the fixed batches.
        kind: the loss the model was trained with (``mse``, ``l1``, ``huber``).
        tasks: target names and/or :data:`TOTAL`.
    Returns:
        One :class:`SetLoss` per task that has a labelled structure in the set (others are left out).
    """
    names = [s.name for s in model.targets]
    per_batch = []
    with torch.no_grad():
        for b in batches:
            losses, count = property_losses(model, model, b, kind)
            per_batch.append((losses.double().cpu(), count.cpu(), float(weighted_total(losses, count, model.loss_weight))))
    out: dict[str, SetLoss] = {}
    for task in tasks:
        if task == TOTAL:
            sizes = [b.num_graphs for b in batches]
            n = sum(sizes)
            closures = [_total_closure(model, b, kind) for b in batches]
            weights = [s / n for s in sizes]
            value = sum(w * t for w, (_, _, t) in zip(weights, per_batch))
            out[task] = SetLoss(task, closures, weights, n, value)
            continue
        j = names.index(task)
        counts = [int(c[j]) for _, c, _ in per_batch]
        labelled = sum(counts)
        if labelled == 0:
            continue
        keep = [i for i, c in enumerate(counts) if c > 0]
        weights = [counts[i] / labelled for i in keep]
        value = sum(w * float(per_batch[i][0][j]) for w, i in zip(weights, keep))
        out[task] = SetLoss(task, [_target_closure(model, batches[i], kind, j) for i in keep], weights, labelled, value)
    return out


def _target_closure(model: PropertyModel, batch: GraphBatch, kind: str, j: int) -> C.LossFn:
    return lambda: property_losses(model, model, batch, kind)[0][j]


def _total_closure(model: PropertyModel, batch: GraphBatch, kind: str) -> C.LossFn:
    def loss() -> Tensor:
        losses, count = property_losses(model, model, batch, kind)
        return weighted_total(losses, count, model.loss_weight)

    return loss


class SetHVP:
    """The Hessian of a :class:`SetLoss` as a linear operator, accumulated batch by batch.

    ``H v = sum_b w_b H_b v``, each ``H_b v`` by :class:`pipeline.curvature.HVPOperator` (double
    backprop or finite differences), so only one batch's graph is alive at a time.

    Attributes:
        n, dtype, device: size, dtype and device of the parameters.
        calls: set-level products so far (each costs ``len(loss.closures)`` batch products).
    Shapes: ``op(v)`` maps (n,) to (n,).
    """

    def __init__(self, loss: SetLoss, params: Sequence[Tensor], method: C.HVPMethod) -> None:
        self.ops = [C.HVPOperator(f, params, method=method) for f in loss.closures]
        self.weights = list(loss.weights)
        self.n, self.dtype, self.device = self.ops[0].n, self.ops[0].dtype, self.ops[0].device
        self.method = method
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        """(n,) -> (n,) Hessian-vector product of the set loss."""
        self.calls += 1
        out = None
        for w, op in zip(self.weights, self.ops):
            hv = op(v) * w
            out = hv if out is None else out + hv
        return out


def choose_method(loss: SetLoss, params: Sequence[Tensor], requested: str, seed: int) -> tuple[str, dict[str, Any]]:
    """Check double backprop against finite differences on one random vector; pick the HVP method.

    The check runs on the task's first batch (whether double backprop is right depends on the
    model's operations, not on the batch) with :func:`pipeline.curvature.check_hvp`.

    Args:
        loss: the task's set loss. params: the parameter group.
        requested: ``auto``, ``autograd`` or ``fd`` (the check is recorded either way).
        seed: seeds the random vector.
    Returns:
        (``"autograd"`` or ``"fd"``, the check: ``rel_error``, ``fd_self_error``, ``hv_norm``,
        ``tolerance``, ``error``).
    """
    report = C.check_hvp(loss.closures[0], params, n_vectors=1, seed=seed)
    tol = HVP_TOLERANCE.get(params[0].dtype, 1e-2)
    check = {"rel_error": report["max_rel_error"], "rel_error_extrapolated": report["max_rel_error_extrapolated"],
             "fd_self_error": report["fd_self_errors"][0], "hv_norm": report["hv_norms"][0], "tolerance": tol,
             "error": report["error"]}
    if requested in ("autograd", "fd"):
        return requested, check
    # against the extrapolated differences too: plain central differences can be the inaccurate
    # side (a trained PaiNN: 1.5e-4 from double backprop at the default step, 1e-8 extrapolated)
    ok = report["error"] is None and min(report["max_rel_error"], report["max_rel_error_extrapolated"]) < tol
    return ("autograd" if ok else "fd"), check


# ---------------------------------------------------------------------------------- analysis
def analyse(op: Any, cfg: CurvatureConfig) -> dict[str, Any]:
    """Top eigenpairs, trace, spectral density, negative mass and level statistics of one operator.

    Args:
        op: a symmetric linear operator (:class:`SetHVP`).
        cfg: sizes of each estimate and the seed (the same random vectors for every task).
    Returns:
        Plain data: ``eigenvalues`` (k,), ``residuals`` (k,), ``residual_estimates`` (k,),
        ``lanczos_iterations``, ``breakdowns``, ``trace``, ``trace_se``, ``density``
        (``nodes`` and ``weights``, each (slq_starts, m) lists), ``negative_mass`` (below 0),
        ``negative_mass_significant`` (below ``-NEGATIVE_BEYOND x`` the top eigenvalue),
        ``r_top`` (level-spacing ratio of the top-k Ritz values; nan with k < 3),
        ``r_ritz`` (of all Ritz values of the Lanczos run), ``hvps`` (set-level products).
    """
    # One Lanczos run serves three estimates: its Rademacher start makes it the first SLQ start,
    # and its basis deflates the trace probes (the top of the spectrum, which dominates plain
    # Hutchinson's variance, is then counted exactly): 55 products per task at the defaults, where
    # separate Lanczos, Hutchinson and SLQ runs took 185. Measured on an MP MPNN's band-gap loss
    # (256 val crystals, float32, 20 Lanczos steps), 10 probes each: 1934 +- 121 deflated,
    # 2345 +- 479 plain, a 4x smaller standard error (16x fewer probes for the same).
    like = torch.zeros(0, dtype=op.dtype, device=op.device)
    lz = C.lanczos(op, cfg.top_k, max(cfg.lanczos_iters, cfg.top_k), seed=cfg.seed, residuals=True,
                   v0=C.rademacher_start(op.n, cfg.seed, like))
    trace, trace_se, _ = C.deflated_trace(op, lz.basis, lz.tridiagonal, cfg.trace_probes, seed=cfg.seed + 2)
    first_nodes, first_weights = C.quadrature(lz.tridiagonal)
    width = max(first_nodes.numel(), min(cfg.slq_iters, op.n))
    nodes = torch.zeros(cfg.slq_starts, width, dtype=torch.float64)
    weights = torch.zeros(cfg.slq_starts, width, dtype=torch.float64)
    nodes[0, :first_nodes.numel()], nodes[0, first_nodes.numel():] = first_nodes, first_nodes[-1]
    weights[0, :first_weights.numel()] = first_weights
    if cfg.slq_starts > 1:
        more_nodes, more_weights = C.slq_density(op, cfg.slq_iters, cfg.slq_starts - 1, seed=cfg.seed + 1)
        m = more_nodes.shape[1]
        nodes[1:, :m], nodes[1:, m:] = more_nodes, more_nodes[:, -1:]
        weights[1:, :m] = more_weights
    ritz = torch.linalg.eigvalsh(lz.tridiagonal)
    top = lz.eigenvalues
    return {"eigenvalues": top.tolist(), "residuals": lz.residuals.tolist() if lz.residuals is not None else None,
            "residual_estimates": lz.residual_estimates.tolist(), "lanczos_iterations": lz.iterations,
            "breakdowns": lz.breakdowns, "trace": trace, "trace_se": trace_se,
            "density": {"nodes": nodes.tolist(), "weights": weights.tolist()},
            "negative_mass": C.negative_mass(nodes, weights),
            "negative_mass_significant": C.negative_mass(nodes + NEGATIVE_BEYOND * abs(float(top[0])), weights),
            "r_top": C.level_spacing_ratio(top) if top.numel() >= 3 else math.nan,
            "r_ritz": C.level_spacing_ratio(ritz) if ritz.numel() >= 3 else math.nan,
            "hvps": op.calls}


def _versions() -> dict[str, str]:
    import dgl

    return {"molmat": __version__, "torch": torch.__version__, "dgl": dgl.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # NaN (a one-probe standard error, r with k < 3) is written as null: strict JSON readers refuse NaN
        tmp.write_text(json.dumps(_finite(data), indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def check_tasks(model: PropertyModel, tasks: Sequence[str] | None) -> list[str]:
    """The tasks to analyse, in the model's target order then ``total``; all of them by default.

    Raises:
        MolmatError: a name that is neither a target of the model nor ``total``.
    """
    names = [s.name for s in model.targets]
    if not tasks:
        return names + [TOTAL]
    unknown = [t for t in tasks if t not in names and t != TOTAL]
    if unknown:
        raise MolmatError(f"unknown task(s) {', '.join(unknown)}: the model's targets are {', '.join(names)} "
                          f"(and '{TOTAL}', their weighted sum)")
    return [t for t in names + [TOTAL] if t in tasks]


def default_out(run: str | Path, split: str) -> Path:
    """``RUN/curvature_<split>``."""
    return Path(run) / f"curvature_{split}"


def curvature(run: str | Path, data: str | Path, split: str = "val", tasks: Sequence[str] | None = None,
              params: str | None = None, out: str | Path | None = None, config: CurvatureConfig | None = None,
              device: torch.device | str | None = None) -> dict[str, Any]:
    """Hessian spectra of each target's loss (and the total) of a trained model on a split.

    Args:
        run: run or model directory (``RUN/best`` is used when present).
        data: shard directory the model can read.
        split: ``train``, ``val``, ``test`` or ``all``.
        tasks: target names and/or ``total``; default every target and ``total``.
        params: ``all``, ``encoder`` or ``heads``; default ``config.params``.
        out: output directory; default ``RUN/curvature_<split>``.
        config: the ``curvature`` config section (default: its defaults).
        device: where to compute; default a GPU when torch and DGL can use one, else the CPU.
    Returns:
        What ``OUT/curvature.json`` holds: ``tasks`` (per task: ``eigenvalues``, ``residuals``,
        ``trace``, ``trace_se``, ``density``, ``negative_mass``, ``r_top``, ``r_ritz``,
        ``method``, ``hvp_check``, ``seconds``, ``loss``, ``labelled``), ``complete``,
        ``settings``, ``n_params``, ``cost`` (HVP over gradient), and where and how it ran.
    Raises:
        MolmatError: unknown task or parameter group, a model that cannot read the shards, an
            empty split, or no task with a labelled structure in the selected set.
    """
    from pipeline.plots import curvature_comparison_plot, spectral_density_plot
    from pipeline.training import pick_device

    cfg = config or CurvatureConfig()
    group = params or cfg.params
    if group not in PARAM_GROUPS:
        raise MolmatError(f"unknown parameter group {group!r}; expected one of {', '.join(PARAM_GROUPS)}")
    device = torch.device(device) if device is not None else pick_device("auto")
    t_start = time.perf_counter()
    # one network's loss surface: an ensemble's members are analysed one at a time
    ms = open_model_on_split(run, data, split, device, kinds=[PROPERTY_MODEL])
    model = ms.model
    wanted = check_tasks(model, tasks)
    out = Path(out) if out is not None else default_out(run, split)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float64 if cfg.float64 else torch.float32
    model.eval()
    if cfg.float64:
        model.double()
    batches = [batch_to_dtype(b.to(device), dtype) for b in select_batches(ms.dataset, cfg.batches, cfg.batch_size, cfg.seed)]
    kind = str(model.meta.get("finetune", {}).get("loss", "mse"))
    group_params = parameter_group(model, group)
    chosen = {id(p) for p in group_params}
    for p in model.parameters():
        # only the group is differentiated: the rest is constant, which saves its backward
        p.requires_grad_(id(p) in chosen)
    if not group_params:
        raise MolmatError(f"the model has no {group} parameters")
    model_dir = Path(run) / "best" if (Path(run) / "best").is_dir() else Path(run)
    result: dict[str, Any] = {
        "model_dir": str(model_dir.resolve()), "data": str(Path(data).resolve()), "split": split,
        "records": sum(b.num_graphs for b in batches), "split_records": len(ms.dataset), "params": group,
        "n_params": C.num_params(group_params), "n_params_model": C.num_params(model.parameters()),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "loss": kind,
        "settings": cfg.model_dump(mode="json"), "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False, "not_run": [],
        "r_reference": {"goe": C.GOE_MEAN_R, "poisson": C.POISSON_MEAN_R}, "tasks": {}}
    json_path = out / JSON_NAME
    with hvp_context(device):
        losses = set_losses(model, batches, kind, wanted)
        result["no_labels"] = [t for t in wanted if t not in losses]
        todo = [t for t in wanted if t in losses]
        if not todo:
            raise MolmatError(f"no structure among the {result['records']} selected from the {split} split is labelled "
                              f"for {', '.join(wanted)}")
        log.info("curvature of %s on %d %s structures (%d batch(es)), %s parameters (%d), %s, tasks %s", model_dir,
                 result["records"], split, len(batches), group, result["n_params"], result["dtype"], ", ".join(todo))
        timed = losses[TOTAL] if TOTAL in losses else losses[todo[0]]
        cost = C.time_hvp_vs_grad(timed.closures[0], group_params, repeats=3, seed=cfg.seed)
        result["cost"] = {**cost, "task": timed.name, "per": "batch"}
        # The check is made in float64 whatever the analysis dtype: it asks whether the model's
        # operations have differentiable backward passes, and float32 finite differences (~1e-3
        # relative) cannot tell 1e-4 apart (an MPNN on crystals, right in float64 at 4e-8, failed a
        # float32 check and was analysed with noisy finite differences).
        if dtype == torch.float64:
            check_losses, check_params = losses, group_params
        else:
            model64 = copy.deepcopy(model).double()
            chosen64 = {name for name, p in model.named_parameters() if id(p) in chosen}
            check_params = [p for name, p in model64.named_parameters() if name in chosen64]
            # the same first batch, collated afresh: batch_to_dtype casts in place
            first = select_batches(ms.dataset, cfg.batches, cfg.batch_size, cfg.seed)[0].to(device)
            check_losses = set_losses(model64, [batch_to_dtype(first, torch.float64)], kind, todo)
        for i, task in enumerate(todo):
            t0 = time.perf_counter()
            method, check = choose_method(check_losses[task], check_params, cfg.hvp, cfg.seed) \
                if task in check_losses else choose_method(losses[task], group_params, cfg.hvp, cfg.seed)
            op = SetHVP(losses[task], group_params, method)
            entry = {"kind": TOTAL if task == TOTAL else "target", "labelled": losses[task].labelled,
                     "loss": losses[task].value, "method": method, "hvp_check": check, **analyse(op, cfg)}
            entry["seconds"] = time.perf_counter() - t0
            entry["hvp_vs_grad"] = cost["ratio_autograd" if method == "autograd" else "ratio_fd"]
            result["tasks"][task] = entry
            log.info("curvature %d/%d %s: top eigenvalue %.5g (residual %.2g), trace %.5g +- %.2g, negative mass %.3f, "
                     "%s HVPs (check %.1e), %.1f s", i + 1, len(todo), task, entry["eigenvalues"][0],
                     entry["residuals"][0], entry["trace"], entry["trace_se"] if math.isfinite(entry["trace_se"]) else 0.0,
                     entry["negative_mass_significant"], method, check["rel_error"], entry["seconds"])
            result["seconds"] = time.perf_counter() - t_start
            _write_json(json_path, result)
            if cfg.max_minutes is not None and time.perf_counter() - t_start > cfg.max_minutes * 60 and i + 1 < len(todo):
                result["not_run"] = todo[i + 1:]
                log.warning("curvature.max_minutes=%s reached after %s; not run: %s (the output is marked incomplete)",
                            cfg.max_minutes, task, ", ".join(result["not_run"]))
                break
    result["complete"] = not result["not_run"]
    result["seconds"] = time.perf_counter() - t_start
    pictures = []
    for task, entry in result["tasks"].items():
        path = out / f"curvature_{_safe(task)}.png"
        spectral_density_plot(entry["density"]["nodes"], entry["density"]["weights"], entry["eigenvalues"], task, path,
                              cfg.sigma, trace=entry["trace"])
        pictures.append(path.name)
    curvature_comparison_plot({t: (e["density"]["nodes"], e["density"]["weights"], e["eigenvalues"], e["trace"])
                               for t, e in result["tasks"].items()}, out / COMPARISON_PNG, cfg.sigma)
    result["pictures"] = pictures + [COMPARISON_PNG]
    _write_json(json_path, result)
    return _finite(result)


def _safe(name: str) -> str:
    """A target name as a file-name part (targets may hold characters such as '/')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table of the per-task results of :func:`curvature` (sharpest first)."""
    rows = sorted(result["tasks"].items(), key=lambda kv: -(kv[1]["eigenvalues"][0] or 0.0))
    width = max([len("task")] + [len(t) for t in result["tasks"]])
    lines = [f"{'task':<{width}}  {'top eigenvalue':>14}  {'residual':>9}  {'trace':>11}  {'+-':>9}  "
             f"{'neg. mass':>9}  {'<r> top':>7}  {'method':>8}  {'seconds':>7}"]
    for task, e in rows:
        se = e["trace_se"] if e["trace_se"] is not None else math.nan
        r = e["r_top"] if e["r_top"] is not None else math.nan
        lines.append(f"{task:<{width}}  {e['eigenvalues'][0]:>14.5g}  {e['residuals'][0]:>9.2g}  {e['trace']:>11.5g}  "
                     f"{se:>9.2g}  {e['negative_mass_significant']:>9.3f}  {r:>7.3f}  {e['method']:>8}  {e['seconds']:>7.1f}")
    lines.append(f"neg. mass: spectral mass below -{NEGATIVE_BEYOND:g} x the top eigenvalue; <r>: level-spacing "
                 f"ratio of the top Ritz values (GOE {C.GOE_MEAN_R:.3f}, Poisson {C.POISSON_MEAN_R:.3f})")
    return "\n".join(lines)
