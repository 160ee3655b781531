"""Run the ``molmat`` command line unchanged, recording where the training time goes.

``python bench/_molmat_timed.py finetune ARGS...`` is ``molmat finetune ARGS...`` (it calls
:func:`pipeline.cli.main`, the console script's entry point, with the same arguments) with one
addition: :class:`finetune.train.Trainer` is replaced by a subclass that counts the graphs fed to
training steps and times validation and checkpoint writing. When ``fit()`` returns it writes
``RUN/bench_timing.json`` (``bench_timing.rank<R>.json`` on ranks > 0) with::

    graphs, steps          graphs and optimizer steps of this rank
    fit_s                  wall time of Trainer.fit (what train.max_minutes limits)
    eval_s, save_s         validation and last.pt/best/ writing inside fit
    train_s                fit_s - eval_s - save_s: training steps incl. data loading
    first_step_s           time from fit() start to the end of the first training step
    epochs                 per validation (epoch end): steps, graphs and training-only seconds so far

Nothing in the model, the loss, the data or the optimiser changes; the hooks add two
``time.perf_counter()`` calls per step. Used by bench_finetune.py and bench_ddp.py only.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (sets DGLBACKEND)
import finetune.train as _ft  # noqa: E402
from pipeline.training import Trainer  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from pipeline.graphs import GraphBatch
    from pipeline.training import TrainResult


class TimedTrainer(Trainer):
    """:class:`pipeline.training.Trainer` plus counters; behaviour is unchanged."""

    def __init__(self, model, loss_fn, eval_fn, monitor, save_best, *args, **kwargs):  # noqa: D401
        self.bench = {"graphs": 0, "steps": 0, "eval_s": 0.0, "save_s": 0.0, "fit_s": 0.0, "first_step_s": None,
                      "evals": 0, "epochs": []}
        stats = self.bench

        def timed_loss(m: torch.nn.Module, batch: GraphBatch) -> tuple[torch.Tensor, dict[str, float]]:
            """Count the batch's graphs and the step (and time the first step), then call ``loss_fn``."""
            stats["graphs"] += batch.num_graphs
            stats["steps"] += 1
            if stats["steps"] == 2 and stats["first_step_s"] is None:
                stats["first_step_s"] = time.perf_counter() - stats["_t0"]
            return loss_fn(m, batch)

        def timed_eval(m: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
            """Record the training-only counters at the epoch's end, then time ``eval_fn``."""
            t = time.perf_counter()
            # training-only time so far, at the end of each epoch's training steps
            stats["epochs"].append({"steps": stats["steps"], "graphs": stats["graphs"],
                                    "train_s": t - stats["_t0"] - stats["eval_s"] - stats["save_s"]})
            try:
                return eval_fn(m, loader)
            finally:
                stats["eval_s"] += time.perf_counter() - t
                stats["evals"] += 1

        def timed_save_best() -> None:
            """Call ``save_best`` and add its time to ``save_s``."""
            t = time.perf_counter()
            try:
                save_best()
            finally:
                stats["save_s"] += time.perf_counter() - t

        super().__init__(model, timed_loss, timed_eval, monitor, timed_save_best, *args, **kwargs)

    def save_last(self) -> None:
        """:meth:`Trainer.save_last` with its time added to ``save_s``."""
        t = time.perf_counter()
        try:
            super().save_last()
        finally:
            self.bench["save_s"] += time.perf_counter() - t

    def fit(self) -> TrainResult:
        """:meth:`Trainer.fit`, then write the counters to ``RUN/bench_timing[.rank<R>].json``."""
        self.bench["_t0"] = time.perf_counter()
        try:
            return super().fit()
        finally:
            b = self.bench
            b["fit_s"] = time.perf_counter() - b.pop("_t0")
            b["train_s"] = b["fit_s"] - b["eval_s"] - b["save_s"]
            b["graphs_per_s"] = b["graphs"] / b["train_s"] if b["train_s"] > 0 else None
            b["rank"], b["world_size"] = self.rank, self.world
            b["torch_threads"] = __import__("torch").get_num_threads()
            b["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
            name = "bench_timing.json" if self.rank == 0 else f"bench_timing.rank{self.rank}.json"
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / name).write_text(json.dumps(b, indent=1))


_ft.Trainer = TimedTrainer

if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
