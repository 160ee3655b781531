"""One trainer for every stage (fine-tuning, pretraining): AdamW, warm-up then cosine or plateau,
gradient clipping, early stopping, a wall-clock budget, ``metrics.csv``, resumable ``last.pt``.

The trainer knows nothing about chemistry: a stage gives it a model, a loss function and an
evaluation function. Shuffling uses :class:`EpochSampler`, whose order depends only on (seed,
epoch), so a run resumed from ``last.pt`` sees exactly the batches an uninterrupted run would,
also when it stopped mid-epoch.
"""
from __future__ import annotations

import atexit
import csv
import functools
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.config import TrainConfig
from pipeline.distributed import all_reduce_mean, any_flag, scaled_lr
from pipeline.graphs import GraphBatch, collate

log = logging.getLogger("molmat.train")


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when torch (and a CUDA build of DGL) can use it, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler(Sampler[int]):
    """Shuffled indices whose order depends only on (seed, epoch); can start mid-epoch.

    With ``world_size > 1`` each rank takes every ``world_size``-th index of the same
    permutation (padded by wrapping so all ranks get the same count), like
    ``DistributedSampler``.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples (of this rank)."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """This rank's full index order for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        per_rank = math.ceil(self.n / self.world) if self.n else 0
        perm = (perm * (1 + (per_rank * self.world) // max(self.n, 1)))[: per_rank * self.world]
        return perm[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(len(self.order()) - self.start, 0)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGUSR1 and leave the stop to the trainer.

    Slurm signals every process of a job. A worker killed by it makes PyTorch raise "DataLoader
    worker is killed" in the main process at an arbitrary point, possibly before ``last.pt`` is
    written, and under DDP on one rank but not another. The main process shuts its workers down
    once it has saved; leftovers are killed when it exits (:func:`_kill_leftover_workers`).
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the parent across the fork


def _kill_leftover_workers() -> None:
    # multiprocessing's own exit hook terminates daemonic children with SIGTERM, which loader
    # workers ignore, and then joins them forever; this hook is registered later, so runs first.
    # It does the same first (other daemonic children keep their SIGTERM cleanup) and SIGKILLs
    # only what is still alive after that.
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.daemon]
    for proc in children:
        proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in children:
        proc.join(max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.kill()


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_kill_leftover_workers)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers are never killed by a stop signal meant for the trainer.

    With workers, each gets :func:`ignore_stop_signals` as its ``worker_init_fn``, and
    SIGTERM/SIGUSR1 are blocked while the workers are forked (they start at each ``iter``), so a
    signal in that window neither kills a worker nor is lost: the parent receives it when it
    unblocks. Takes DataLoader's arguments except ``worker_init_fn``.
    """

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers"):
            _register_exit_hook()
            kwargs["worker_init_fn"] = ignore_stop_signals
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> Any:
        """Start the workers with the stop signals blocked."""
        if not self.num_workers:
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_loader(dataset: Any, batch_size: int, sampler: Sampler | None = None, num_workers: int = 0,
                shuffle_seed: int | None = None, collate_fn: Callable[[list], Any] = collate) -> DataLoader:
    """DataLoader over shard records that yields batches (:class:`GraphBatch` by default)."""
    if sampler is None and shuffle_seed is not None:
        sampler = EpochSampler(len(dataset), shuffle_seed)
    # A private generator: DataLoader would otherwise draw its worker seed from the global RNG at
    # each epoch start, and a run resumed mid-epoch would then diverge from an uninterrupted one.
    return StopSafeLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                          collate_fn=collate_fn, persistent_workers=False, drop_last=False,
                          generator=torch.Generator().manual_seed(shuffle_seed or 0))


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
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.cfg.schedule == "cosine" and step >= self.warmup:
            t = min(1.0, (step - self.warmup) / max(self.total - self.warmup, 1))
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


LossFn = Callable[[torch.nn.Module, GraphBatch], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module, DataLoader], dict[str, float]]


class Trainer:
    """Runs the optimisation loop for one stage and owns ``last.pt`` and ``metrics.csv``.

    Args:
        model: the module to train (already on ``device``; wrapped in DDP by the caller if needed).
        loss_fn: ``(model, batch) -> (scalar loss, {name: value})`` on a training batch.
        eval_fn: ``(model, loader) -> {metric: value}``; must contain ``monitor``.
        monitor: validation metric to minimise (early stopping, best model).
        save_best: called with no arguments whenever ``monitor`` improves (rank 0 writes ``best/``).
        train_set, val_set: datasets of shard records.
        cfg: :class:`TrainConfig`.
        out: run directory for ``last.pt``, ``metrics.csv``.
        param_groups: optional optimizer parameter groups (e.g. a separate encoder learning rate).
        rank, world_size: distributed position; only rank 0 writes files and logs.
        device: where batches go (default from ``cfg.device``).
        collate_fn: records -> batch with a ``.to(device)`` method (default :func:`collate`).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, eval_fn: EvalFn, monitor: str,
                 save_best: Callable[[], None], train_set: Any, val_set: Any, cfg: TrainConfig, out: str | Path,
                 param_groups: Sequence[dict[str, Any]] | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, collate_fn: Callable[[list], Any] = collate) -> None:
        self.model, self.loss_fn, self.eval_fn, self.monitor = model, loss_fn, eval_fn, monitor
        self.save_best, self.cfg, self.out = save_best, cfg, Path(out)
        self.rank, self.world = rank, world_size
        self.device = device or pick_device(cfg.device)
        groups = list(param_groups) if param_groups else [{"params": [p for p in model.parameters() if p.requires_grad]}]
        lr = scaled_lr(cfg.lr, world_size, cfg.lr_scaling)
        for g in groups:
            g["lr"] = scaled_lr(g.get("lr", cfg.lr), world_size, cfg.lr_scaling)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
        if world_size > 1 and not hasattr(model, "module"):
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if rank == 0:
            log.info("effective batch size %d (%d per process x %d), lr %.3g (scaling rule: %s)",
                     cfg.batch_size * world_size, cfg.batch_size, world_size, lr, cfg.lr_scaling)
        self.sampler = EpochSampler(len(train_set), cfg.seed, shuffle=True, rank=rank, world_size=world_size)
        self.train_loader = make_loader(train_set, cfg.batch_size, self.sampler, cfg.num_workers, collate_fn=collate_fn)
        # Validation is split by whole batches (batch i goes to rank i mod world): every batch is
        # the one a single process would see, so batch-wise metrics (contrastive accuracy) and the
        # eval functions' reductions give the single-process numbers.
        val_batches = [list(range(i, min(i + cfg.batch_size, len(val_set))))
                       for i in range(0, len(val_set), cfg.batch_size)][rank::world_size]
        self.val_loader = StopSafeLoader(val_set, batch_sampler=val_batches, num_workers=cfg.num_workers,
                                         collate_fn=collate_fn)
        steps_per_epoch = math.ceil(len(self.sampler.order()) / cfg.batch_size)
        self.steps_per_epoch = steps_per_epoch
        self.schedule = _Schedule(self.optimizer, cfg, steps_per_epoch * cfg.epochs)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": math.inf, "best_epoch": -1,
                      "bad_epochs": 0, "elapsed": 0.0}
        self._stop_signal: int | None = None
        self._writer = None

    # -------------------------------------------------------------------------------- checkpoint
    def _checkpoint(self) -> dict[str, Any]:
        model = self.model.module if hasattr(self.model, "module") else self.model
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "state": dict(self.state),
                "rng": {"torch": torch.get_rng_state(),
                        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                        "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())},
                "config": self.cfg.model_dump(mode="json"), "world_size": self.world}

    def save_last(self) -> None:
        """Write ``last.pt`` (full training state) atomically; rank 0 only."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "last.pt.tmp"
        torch.save(self._checkpoint(), tmp)
        os.replace(tmp, self.out / "last.pt")

    def try_resume(self) -> bool:
        """Load ``last.pt`` if present; returns True when training resumes from it."""
        path = self.out / "last.pt"
        if not path.exists():
            return False
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = self.model.module if hasattr(self.model, "module") else self.model
        model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.state.update(ckpt["state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(("MT19937", ckpt["rng"]["numpy"].numpy().astype(np.uint32), ckpt["rng"]["numpy_pos"], 0, 0.0))
        random.setstate(_literal_state(ckpt["rng"]["python"]))
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
    def _log_metrics(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._writer.add_scalar(k, v, row["epoch"])

    def fit(self) -> TrainResult:
        """Train until the epoch limit, early stopping, the time budget or a stop signal."""
        self.try_resume()
        self.install_signal_handlers()
        try:
            return self._loop()
        finally:
            self.restore_signal_handlers()

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
            losses: list[float] = []
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
            for batch in self.train_loader:
                batch = batch.to(self.device)
                self.schedule.step(self.state["step"])
                loss, parts = self.loss_fn(self.model, batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                losses.append(float(loss.detach()))
                self.state["step"] += 1
                self.state["batch_in_epoch"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                elif self.rank == 0 and self.state["step"] % cfg.log_every == 0:
                    log.info("epoch %d step %d loss %.5g lr %.3g", epoch, self.state["step"], losses[-1],
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
            metrics = self.eval_fn(self.model, self.val_loader)
            value = metrics[self.monitor]
            self.schedule.epoch_end(value)
            improved = value < self.state["best"]
            if improved:
                self.state["best"], self.state["best_epoch"], self.state["bad_epochs"] = value, epoch, 0
                if self.rank == 0:
                    self.save_best()
            else:
                self.state["bad_epochs"] += 1
            self.state["epoch"] = epoch + 1
            self.state["batch_in_epoch"] = 0
            if cfg.max_minutes is not None and cfg.schedule == "cosine":
                # the mean over ranks, so that every rank anneals on the same horizon
                self.schedule.fit_budget(self.state["step"], all_reduce_mean(time.time() - t_start, self.device),
                                         cfg.max_minutes * 60)
            train_loss = all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), self.device)
            row = {"epoch": epoch, "step": self.state["step"], "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": train_loss, **metrics,
                   "seconds": round(time.time() - t_start, 2)}
            self._log_metrics(row)
            if self.rank == 0:
                log.info("epoch %d: train_loss %.5g, %s %.5g%s", epoch, row["train_loss"], self.monitor, value,
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


def _literal_state(text: str) -> tuple:
    """Parse ``repr(random.getstate())`` back (a tuple of ints and None only, no eval)."""
    import ast

    return ast.literal_eval(text)
