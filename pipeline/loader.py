"""Samplers and data loaders that a stopped or resumed run can trust.

:class:`EpochSampler` orders records by (seed, epoch) only, so a run resumed mid-epoch sees exactly
the batches an uninterrupted run would; :class:`StopSafeLoader` keeps loader workers alive through
the SIGTERM/SIGUSR1 that Slurm sends to every process of a job, so the trainer can save first.
"""
from __future__ import annotations

import atexit
import functools
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


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
    if children and threading.current_thread() is threading.main_thread():
        # Killing a leftover worker is intended here, but PyTorch's SIGCHLD handler (set while a
        # loader iterator lives) would report it as a failed worker, with a traceback printed
        # after the run's own one-line error; seen under load, when a worker outlives the grace time.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
                shuffle_seed: int | None = None, *, collate_fn: Callable[[list], Any]) -> DataLoader:
    """DataLoader over records that yields ``collate_fn(records)`` batches, in a fixed order.

    Args:
        dataset: indexable records (e.g. :class:`pipeline.shards.ShardDataset`).
        batch_size: records per batch.
        sampler: index order (default: the dataset's order, or seeded shuffling with ``shuffle_seed``).
        num_workers: worker processes (stop-signal safe, see :class:`StopSafeLoader`).
        collate_fn: records -> batch (``pipeline.graphs.collate`` for property batches).
    """
    if sampler is None and shuffle_seed is not None:
        sampler = EpochSampler(len(dataset), shuffle_seed)
    # A private generator: DataLoader would otherwise draw its worker seed from the global RNG at
    # each epoch start, and a run resumed mid-epoch would then diverge from an uninterrupted one.
    return StopSafeLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                          collate_fn=collate_fn, persistent_workers=False, drop_last=False,
                          generator=torch.Generator().manual_seed(shuffle_seed or 0))
