"""One trainer for every stage: AdamW, warm-up then cosine or plateau, gradient clipping, early
stopping, a wall-clock budget, ``metrics.csv``, resumable ``last.pt``, preemption by signal.

The trainer knows nothing about chemistry. A stage hands it a model and a :class:`Task`: how to
collate records, the training loss, the validation metrics, which metric to monitor, and how to
save the best model. :class:`Callback` objects see every step, evaluation and save (the built-in
:class:`TimingCallback` writes ``timing.json``, which the benchmarks read, and
:class:`pipeline.plots.LearningCurveCallback` redraws ``learning_curve.png``). Shuffling uses
:class:`pipeline.loader.EpochSampler`, whose order depends only on (seed, epoch), so a run resumed
from ``last.pt`` sees exactly the batches an uninterrupted run would, also mid-epoch.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline import MolmatError
from pipeline.checkpoint import load_training_state, save_training_state, unwrap
from pipeline.config import TrainConfig
from pipeline.distributed import all_reduce_mean, any_flag, scaled_lr
from pipeline.ema import WeightAverage
from pipeline.loader import EpochSampler, StopSafeLoader, make_loader

log = logging.getLogger("molmat.train")


def _dgl_runs_on(device: torch.device) -> str:
    """'' when DGL can put a graph on ``device``, else why not (the wheel on PyPI is a CPU build)."""
    import dgl

    try:
        dgl.graph(([0], [0])).to(device)
    except Exception as exc:  # DGLError: "Device API cuda is not enabled"
        return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return ""


def pick_device(name: str) -> torch.device:
    """The torch device ``train.device`` names, checked to be usable here.

    ``auto`` means CUDA when torch and DGL can both use it, else CPU.

    Raises:
        MolmatError: an unknown device name, or CUDA asked for where torch or DGL cannot use
            it (no GPU visible, a CPU build, a GPU index beyond the visible ones).
    """
    from pipeline import MolmatError

    if name == "auto":
        if torch.cuda.is_available():
            why = _dgl_runs_on(torch.device("cuda"))
            if not why:
                return torch.device("cuda")
            log.warning("torch sees a GPU but DGL cannot use it (%s): running on the CPU; install the CUDA build of "
                        "DGL to use the GPU (README, GPUs)", why)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MolmatError(f"train.device={name!r} is not a device name ({str(exc).splitlines()[0][:120]}); use auto, "
                          "cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise MolmatError(f"train.device={name!r}: molmat runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MolmatError(f"train.device={name} but CUDA is not available here (no GPU visible, or a CPU build of "
                          "torch); use --set train.device=auto or cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise MolmatError(f"train.device={name} but only {torch.cuda.device_count()} GPU(s) are visible (cuda:0.."
                          f"cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES")
    why = _dgl_runs_on(device)
    if why:
        raise MolmatError(f"train.device={name}: torch sees a GPU but DGL cannot use it ({why}); install the CUDA "
                          "build of DGL (README, GPUs) or use --set train.device=cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Task(Protocol):
    """What a stage tells the trainer (fine-tuning, pretraining, and next density and curvature).

    Attributes:
        monitor: the validation metric to minimise (early stopping, best model).
    """

    monitor: str

    def collate(self, records: list[dict[str, Any]]) -> Any:
        """Records -> a batch with a ``.to(device)`` method."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of a batch, and named parts to log (e.g. one loss per target).

        ``model`` is what the trainer optimises (a DDP wrapper under torchrun): call it for the
        forward pass so gradients are synchronised.
        """

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation metrics over this rank's share of the validation batches, reduced over ranks.

        ``model`` is the plain module (no DDP wrapper), in the mode the task sets.
        """

    def save_best(self, model: nn.Module) -> None:
        """Write the deployable model (rank 0 only), given the plain module."""


class Callback:
    """Hooks into the training loop; every method is optional and does nothing by default."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Called once before the first step (after a resume)."""

    def on_step(self, trainer: "Trainer", batch: Any, loss: float) -> None:
        """Called after every optimizer step with the batch and its loss."""

    def on_eval_start(self, trainer: "Trainer") -> None:
        """Called before each validation pass."""

    def on_eval(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None:
        """Called after each validation pass with its metrics."""

    def on_save_start(self, trainer: "Trainer", what: str) -> None:
        """Called before writing ``last`` (training state) or ``best`` (model directory)."""

    def on_save(self, trainer: "Trainer", what: str) -> None:
        """Called after writing ``last`` or ``best``."""

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        """Called once when training stops, however it stopped."""


class TimingCallback(Callback):
    """Counts graphs and steps and times validation and saving; writes ``RUN/timing.json``.

    ``timing.json`` (``timing.rank<R>.json`` on ranks > 0) holds ``graphs``, ``steps``,
    ``fit_s`` (wall time of :meth:`Trainer.fit`, what ``train.max_minutes`` limits), ``eval_s``,
    ``save_s`` (``last.pt``, ``best/`` and the learning curve drawn before ``last.pt``), ``train_s``
    (= fit - eval - save: steps including data loading), ``graphs_per_s``,
    ``first_step_s``, and per epoch the training-only counters. Costs two clock reads a step.
    """

    def __init__(self) -> None:
        self.t0 = 0.0
        self.stats: dict[str, Any] = {}
        self._mark = 0.0

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Start the clock."""
        self.t0 = time.perf_counter()
        self.stats = {"graphs": 0, "steps": 0, "eval_s": 0.0, "save_s": 0.0, "fit_s": 0.0, "first_step_s": None,
                      "evals": 0, "epochs": []}

    def on_step(self, trainer: "Trainer", batch: Any, loss: float) -> None:
        """Count the batch's graphs."""
        s = self.stats
        s["graphs"] += int(getattr(batch, "num_graphs", 0) or 0)
        s["steps"] += 1
        if s["steps"] == 1:
            s["first_step_s"] = time.perf_counter() - self.t0

    def on_eval_start(self, trainer: "Trainer") -> None:
        """Record the training-only counters at the epoch's end."""
        self._mark = time.perf_counter()
        s = self.stats
        s["epochs"].append({"steps": s["steps"], "graphs": s["graphs"],
                            "train_s": self._mark - self.t0 - s["eval_s"] - s["save_s"]})

    def on_eval(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None:
        """Add the validation time."""
        self.stats["eval_s"] += time.perf_counter() - self._mark
        self.stats["evals"] += 1

    def on_save_start(self, trainer: "Trainer", what: str) -> None:
        """Start timing a save."""
        self._mark = time.perf_counter()

    def on_save(self, trainer: "Trainer", what: str) -> None:
        """Add the save time."""
        self.stats["save_s"] += time.perf_counter() - self._mark

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        """Write ``timing.json``."""
        s = self.stats
        s["fit_s"] = time.perf_counter() - self.t0
        s["train_s"] = s["fit_s"] - s["eval_s"] - s["save_s"]
        s["graphs_per_s"] = s["graphs"] / s["train_s"] if s["train_s"] > 0 else None
        s.update(rank=trainer.rank, world_size=trainer.world, torch_threads=torch.get_num_threads(),
                 omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
        name = "timing.json" if trainer.rank == 0 else f"timing.rank{trainer.rank}.json"
        trainer.out.mkdir(parents=True, exist_ok=True)
        (trainer.out / name).write_text(json.dumps(s, indent=1))


class _Schedule:
    """Linear warm-up, then cosine decay to ``min_lr`` over the run, or reduce-on-plateau.

    The cosine horizon is ``train.epochs`` worth of steps, shortened by :meth:`fit_budget` when a
    wall-clock budget will end the run first; otherwise a budget-limited run (``epochs: 1000``,
    ``max_minutes: 30``) would train at an almost constant learning rate and never anneal.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> None:
        self.opt, self.cfg, self.total = optimizer, cfg, max(total_steps, 1)
        self.planned = self.total
        # A short run (small data, `molmat run`) must not spend itself warming up.
        self.warmup = min(cfg.warmup_steps, self.total // 10)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.scale = 1.0          # plateau multiplier
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, step: int) -> None:
        """Set every group's learning rate for optimizer step ``step`` (warm-up x schedule x plateau scale)."""
        # a budget that shortens the run (fit_budget) shortens the warm-up with it, or a short
        # budgeted run (`molmat run`) would end before its learning rate had risen
        warmup = min(self.warmup, self.total // 10)
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if self.cfg.schedule == "cosine" and step >= warmup:
            t = min(1.0, (step - warmup) / max(self.total - warmup, 1))
            factor = 0.5 * (1 + math.cos(math.pi * t))
        else:
            factor = 1.0
        for g, base in zip(self.opt.param_groups, self.base):
            low = min(self.cfg.min_lr, base)
            g["lr"] = (low + (base - low) * factor) * warm * self.scale

    def fit_budget(self, step: int, elapsed: float, budget: float) -> None:
        """Shorten the cosine horizon to the steps the remaining budget allows.

        Args:
            step: optimizer steps done so far.
            elapsed: seconds of the budget used so far (validation included).
            budget: the whole budget in seconds.
        Called at every epoch end with values all ranks agree on, so every rank keeps the same
        learning rate; the estimate follows the measured pace, never going past ``train.epochs``.
        """
        if step <= 0 or elapsed <= 0:
            return
        expected = step + int(max(budget - elapsed, 0.0) / (elapsed / step))
        self.total = max(1, min(self.planned, expected))

    def epoch_end(self, metric: float) -> None:
        """Plateau schedule: scale the learning rate down after ``plateau_patience`` epochs without gain."""
        if self.cfg.schedule != "plateau":
            return
        if metric < self.best - 1e-12:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
                self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same schedule."""
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs, "base": self.base,
                "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``total`` is absent in checkpoints from before budget fitting)."""
        self.scale, self.best, self.bad_epochs, self.base = state["scale"], state["best"], state["bad_epochs"], state["base"]
        self.total = state.get("total", self.total)


@dataclass
class TrainResult:
    """How a training run ended."""

    best_metric: float
    best_epoch: int
    epochs_run: int
    steps: int
    stopped_by: str      # "epochs", "early_stopping", "time_budget", "signal"
    seconds: float


class Trainer:
    """Runs the optimisation loop for one stage and owns ``last.pt`` and ``metrics.csv``.

    Args:
        model: the module to train (already on ``device``); wrapped in DDP here when
            ``world_size > 1``.
        task: the stage's :class:`Task`.
        train_set, val_set: indexable record datasets.
        cfg: :class:`TrainConfig`.
        out: run directory for ``last.pt``, ``metrics.csv``, ``timing.json``.
        param_groups: optional optimizer parameter groups (e.g. a separate encoder learning rate).
        rank, world_size: distributed position; only rank 0 writes files and logs.
        device: where batches go (default from ``cfg.device``).
        callbacks: extra :class:`Callback` objects (a :class:`TimingCallback` is always added, and on
            rank 0 a :class:`pipeline.plots.LearningCurveCallback`, which draws ``learning_curve.png``).
    """

    def __init__(self, model: nn.Module, task: Task, train_set: Any, val_set: Any, cfg: TrainConfig, out: str | Path,
                 param_groups: Sequence[dict[str, Any]] | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, callbacks: Sequence[Callback] = ()) -> None:
        if not cfg.is_resolved():
            raise MolmatError("train.lr or train.batch_size is still 'auto': resolve the config for the data's "
                              "kind first (TrainConfig.resolve)")
        self.task, self.cfg, self.out = task, cfg, Path(out)
        self.rank, self.world = rank, world_size
        self.device = device or pick_device(cfg.device)
        self.raw_model = unwrap(model)
        self.model = model
        if cfg.compile:
            from pipeline.compiled import compile_blocks

            n = compile_blocks(self.raw_model)
            if rank == 0:
                log.info("train.compile: %d encoder blocks compiled (torch.compile, dynamic shapes)", n)
        groups = list(param_groups) if param_groups else [{"params": [p for p in model.parameters() if p.requires_grad]}]
        lr = scaled_lr(cfg.lr, world_size, cfg.lr_scaling, cfg.batch_size, cfg.reference_batch_size)
        for g in groups:
            g["lr"] = scaled_lr(g.get("lr", cfg.lr), world_size, cfg.lr_scaling, cfg.batch_size,
                                cfg.reference_batch_size)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
        if world_size > 1 and self.model is self.raw_model:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if rank == 0:
            log.info("effective batch size %d (%d per process x %d), lr %.3g (train.lr %.3g x %.4g; scaling rule: %s, "
                     "reference batch %d%s)", cfg.batch_size * world_size, cfg.batch_size, world_size, lr, cfg.lr,
                     lr / cfg.lr, cfg.lr_scaling, cfg.reference_batch_size or cfg.batch_size,
                     "" if cfg.reference_batch_size else " = batch_size")
        self.sampler = EpochSampler(len(train_set), cfg.seed, shuffle=True, rank=rank, world_size=world_size)
        self.train_loader = make_loader(train_set, cfg.batch_size, self.sampler, cfg.num_workers,
                                        collate_fn=task.collate)
        # Validation is split by whole batches (batch i goes to rank i mod world): every batch is
        # the one a single process would see, so batch-wise metrics (contrastive accuracy) and the
        # tasks' reductions give the single-process numbers.
        val_batches = [list(range(i, min(i + cfg.batch_size, len(val_set))))
                       for i in range(0, len(val_set), cfg.batch_size)][rank::world_size]
        self.val_loader = StopSafeLoader(val_set, batch_sampler=val_batches, num_workers=cfg.num_workers,
                                         collate_fn=task.collate)
        self.steps_per_epoch = math.ceil(len(self.sampler.order()) / cfg.batch_size)
        self.schedule = _Schedule(self.optimizer, cfg, self.steps_per_epoch * cfg.epochs)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": math.inf, "best_epoch": -1,
                      "batch_size": cfg.batch_size,
                      "bad_epochs": 0, "elapsed": 0.0, "epoch_loss_sum": 0.0, "epoch_loss_count": 0,
                      "epoch_parts": {}}
        # imported here: pipeline.plots subclasses Callback from this module
        from pipeline.plots import LearningCurveCallback

        # TimingCallback first: it opens the save window in which the learning curve is drawn
        self.callbacks: list[Callback] = [TimingCallback(), *([LearningCurveCallback()] if rank == 0 else []), *callbacks]
        self._stop_signal: int | None = None
        self._writer = None
        #: moving average of the weights that validation and best/ see (train.ema_decay)
        self.ema = WeightAverage(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None

    def averaged_weights(self) -> AbstractContextManager[None]:
        """A block in which the model holds the weights that are validated and saved as best: the
        moving average with ``train.ema_decay``, else the live weights."""
        return self.ema.swapped() if self.ema is not None else nullcontext()

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -------------------------------------------------------------------------------- checkpoint
    def save_last(self) -> None:
        """Write ``last.pt`` (full training state) atomically; rank 0 only."""
        if self.rank != 0:
            return
        self._emit("on_save_start", "last")
        extra = {"config": self.cfg.model_dump(mode="json"), "world_size": self.world}
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        save_training_state(self.out / "last.pt", self.raw_model, self.optimizer, self.schedule.state_dict(),
                            self.state, extra)
        self._emit("on_save", "last")

    def save_best(self) -> None:
        """Have the task write the deployable model (the weight average with ``train.ema_decay``); rank 0 only."""
        if self.rank != 0:
            return
        self._emit("on_save_start", "best")
        with self.averaged_weights():
            self.task.save_best(self.raw_model)
        self._emit("on_save", "best")

    def try_resume(self) -> bool:
        """Load ``last.pt`` if present; returns True when training resumes from it."""
        path = self.out / "last.pt"
        if not path.exists():
            return False
        ckpt = load_training_state(path, self.raw_model, self.optimizer)
        saved = ckpt["state"].get("batch_size")
        if saved is not None and saved != self.cfg.batch_size:
            # the position within the epoch is counted in batches: another size would skip other records
            raise MolmatError(f"{path} was saved by a run with train.batch_size={saved}; this run has "
                              f"{self.cfg.batch_size}. Resume with --set train.batch_size={saved}, or start afresh "
                              "with --restart")
        self.schedule.load_state_dict(ckpt["schedule"])
        self.state.update(ckpt["state"])
        if self.ema is not None:
            # the average starts from the resumed weights when last.pt has none (train.ema_decay
            # switched on for the resumed run); otherwise it continues where it stopped
            self.ema = WeightAverage(self.raw_model, self.cfg.ema_decay)
            if "ema" in ckpt:
                try:
                    self.ema.load_state_dict(ckpt["ema"])
                except ValueError as exc:
                    raise MolmatError(f"{path}: {exc}; pass --restart to start afresh") from None
            elif self.rank == 0:
                log.warning("%s holds no weight average (saved without train.ema_decay): the average starts "
                            "from the resumed weights", path)
        if self.rank == 0:
            log.info("resuming from %s at epoch %d, step %d", path, self.state["epoch"], self.state["step"])
        return True

    # ---------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 (Slurm preemption): finish the step, write last.pt, stop."""
        self._previous_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread (e.g. inside a notebook worker)
                pass

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`."""
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    # ------------------------------------------------------------------------------------ loop
    def _diverged(self, what: str) -> None:
        """Stop a run whose loss or validation metric is no longer a number; ``last.pt`` is not overwritten."""
        from pipeline import MolmatError

        last = self.out / "last.pt"
        kept = (f"{last} (the last saved state) and the best model so far are kept"
                if last.exists() else "no last.pt was written yet")
        raise MolmatError(f"training diverged: {what}; {kept}. Lower train.lr (or set train.clip_grad) and re-run "
                          "with --restart")

    def _log_metrics(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.out / "metrics.csv"
        new = not path.exists()
        # the row is written in one piece and taken back if the write fails (a full disk), so a
        # resumed run never appends after half a line
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        with open(path, "a", newline="") as fh:
            start = fh.tell()
            try:
                fh.write(buf.getvalue())
                fh.flush()
            except OSError:
                try:
                    fh.truncate(start)
                except OSError:
                    pass
                raise
        if self._writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._writer.add_scalar(k, v, row["epoch"])

    def fit(self) -> TrainResult:
        """Train until the epoch limit, early stopping, the time budget or a stop signal."""
        self.try_resume()
        self.install_signal_handlers()
        self._emit("on_fit_start")
        result = None
        try:
            result = self._loop()
            return result
        finally:
            self.restore_signal_handlers()
            self._emit("on_fit_end", result)

    def _train_step(self, batch: Any) -> tuple[float, dict[str, float]]:
        loss, parts = self.task.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return float(loss.detach()), parts

    def _loop(self) -> TrainResult:
        cfg = self.cfg
        if cfg.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install molmat[tensorboard]); continuing without it")
        t_start = time.time() - self.state["elapsed"]
        bar = None
        stopped_by = "epochs"
        show_bar = self.rank == 0 and sys.stderr.isatty()
        while self.state["epoch"] < cfg.epochs:
            epoch = self.state["epoch"]
            skip = self.state["batch_in_epoch"]
            self.sampler.set_epoch(epoch, start=skip * cfg.batch_size)
            self.model.train()
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
            for batch in self.train_loader:
                batch = batch.to(self.device)
                self.schedule.step(self.state["step"])
                loss, parts = self._train_step(batch)
                diverged = not math.isfinite(loss)
                if self.world > 1:  # every rank stops together, or DDP deadlocks
                    diverged = any_flag(diverged, self.device)
                if diverged:
                    self._diverged(f"the training loss is {loss} at epoch {epoch}, step {self.state['step']}")
                # epoch sums live in the resumable state, so an epoch interrupted by a signal
                # reports the mean over all of its steps, not only those after the resume
                self.state["epoch_loss_sum"] += loss
                self.state["epoch_loss_count"] += 1
                for k, v in parts.items():
                    acc = self.state["epoch_parts"].setdefault(k, [0.0, 0])
                    if math.isfinite(v):
                        acc[0] += v
                        acc[1] += 1
                self.state["step"] += 1
                self.state["batch_in_epoch"] += 1
                self._emit("on_step", batch, loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                elif self.rank == 0 and self.state["step"] % cfg.log_every == 0:
                    log.info("epoch %d step %d loss %.5g lr %.3g", epoch, self.state["step"], loss,
                             self.optimizer.param_groups[0]["lr"])
                over_budget = cfg.max_minutes is not None and time.time() - t_start > cfg.max_minutes * 60
                if self.world > 1:  # every rank must stop at the same step, or DDP deadlocks
                    if any_flag(self._stop_signal is not None, self.device):
                        self._stop_signal = self._stop_signal or signal.SIGTERM
                    over_budget = any_flag(over_budget, self.device)
                if self._stop_signal is not None:
                    break
                if over_budget:
                    stopped_by = "time_budget"
                    break
            if bar is not None:
                bar.close()
            self.state["elapsed"] = time.time() - t_start
            if self._stop_signal is not None:
                self.save_last()
                stopped_by = "signal"
                if self.rank == 0:
                    log.warning("received signal %d: wrote %s at step %d; re-run the same command to resume",
                                self._stop_signal, self.out / "last.pt", self.state["step"])
                break
            # epoch (or budget-truncated epoch) finished: validate
            self._emit("on_eval_start")
            self.raw_model.eval()
            with self.averaged_weights():
                metrics = self.task.evaluate(self.raw_model, self.val_loader)
            self._emit("on_eval", epoch, metrics)
            value = metrics[self.task.monitor]
            if not math.isfinite(value):
                self._diverged(f"the validation {self.task.monitor} is {value} after epoch {epoch} (diverged weights, "
                               "or no labels in the val split)")
            self.schedule.epoch_end(value)
            improved = value < self.state["best"]
            if improved:
                self.state["best"], self.state["best_epoch"], self.state["bad_epochs"] = value, epoch, 0
                self.save_best()
            else:
                self.state["bad_epochs"] += 1
            self.state["epoch"] = epoch + 1
            self.state["batch_in_epoch"] = 0
            if cfg.max_minutes is not None and cfg.schedule == "cosine":
                # the mean over ranks, so that every rank anneals on the same horizon
                self.schedule.fit_budget(self.state["step"], all_reduce_mean(time.time() - t_start, self.device),
                                         cfg.max_minutes * 60)
            count = self.state["epoch_loss_count"]
            train_loss = all_reduce_mean(self.state["epoch_loss_sum"] / count if count else float("nan"), self.device)
            parts = {f"train_{k}": all_reduce_mean(s / n if n else float("nan"), self.device)
                     for k, (s, n) in sorted(self.state["epoch_parts"].items())}
            self.state["epoch_loss_sum"], self.state["epoch_loss_count"], self.state["epoch_parts"] = 0.0, 0, {}
            row = {"epoch": epoch, "step": self.state["step"], "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": train_loss, **parts, **metrics, "seconds": round(time.time() - t_start, 2)}
            self._log_metrics(row)
            if self.rank == 0:
                log.info("epoch %d: train_loss %.5g, %s %.5g%s", epoch, row["train_loss"], self.task.monitor, value,
                         " (best)" if improved else "")
            self.save_last()
            if stopped_by == "time_budget":
                log.info("wall-clock budget of %s min reached; best model kept", cfg.max_minutes)
                break
            if cfg.patience is not None and self.state["bad_epochs"] >= cfg.patience:
                stopped_by = "early_stopping"
                break
        if self._writer is not None:
            self._writer.close()
        return TrainResult(self.state["best"], self.state["best_epoch"], self.state["epoch"], self.state["step"],
                           stopped_by, time.time() - t_start)
