"""Distributed training setup from torchrun or Slurm (srun) environment variables.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Under
``srun`` alone, Slurm's ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_NTASKS`` give the same,
and the master address is the first host of ``SLURM_JOB_NODELIST``. One process per GPU; NCCL on
GPUs, gloo on CPUs. Without any of these variables everything runs as a single process.
"""
from __future__ import annotations

import gc
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("molmat.distributed")


@dataclass
class DistEnv:
    """Where this process sits in a distributed job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"   # "torchrun", "slurm" or "none"

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm node list (``gpu[003-005,9],cpu1`` -> ``gpu003``)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect() -> DistEnv:
    """Read the launcher's environment (torchrun first, then Slurm)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = env.get("SLURM_JOB_ID", "0")
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT", 20000 + int(job) % 20000)), "slurm")
    return DistEnv()


def setup(denv: DistEnv, device: torch.device) -> torch.device:
    """Initialise the process group (if distributed) and return this process's device."""
    if device.type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", denv.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    if denv.is_distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
                                rank=denv.rank, world_size=denv.world_size)
        if denv.rank == 0:
            log.info("distributed: %d processes via %s, backend %s", denv.world_size, denv.launcher, backend)
    return device


def teardown(barrier: bool = True) -> None:
    """Destroy the process group if one was created, after waiting for every process.

    Args:
        barrier: wait for the other ranks first. Without it a rank that finishes early (rank 0
            is still writing checkpoints) tears its gloo connections down under the others, which
            then abort now and then. Pass False on an error path, where the other ranks may
            never arrive.

    The DDP module and its reducer sit in reference cycles that hold the process group, so
    ``destroy_process_group`` alone leaves gloo's worker threads running into interpreter
    shutdown; a worker that then drops the last reference to a tensor needs the GIL, is killed by
    the finalising interpreter inside a C++ destructor, and the whole process aborts
    ("terminate called without an active exception", about 1 run in 20 with 2 processes).
    Collecting the cycles first lets the group's destructor join its threads here.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over all processes (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each named scalar over all processes (the values themselves when not distributed).

    Every process must pass the same keys in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` when not distributed).

    For small results such as one validation pass's predictions; objects travel pickled between
    the processes of one job, never through files.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every process if any process has ``flag`` set (keeps ranks stopping together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def lr_scale_factor(world_size: int, rule: str, batch_size: int | None = None,
                    reference_batch_size: int | None = None) -> float:
    """The factor :func:`scaled_lr` multiplies the learning rate by (see there)."""
    if rule not in ("none", "linear", "sqrt"):
        raise ValueError(f"unknown lr scaling rule {rule!r}; expected none, linear or sqrt")
    if reference_batch_size is None or batch_size is None:
        ratio = float(world_size)  # the reference is one process's batch: only the process count matters
    else:
        ratio = batch_size * world_size / reference_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return ratio ** 0.5
    return 1.0


def scaled_lr(lr: float, world_size: int, rule: str, batch_size: int | None = None,
              reference_batch_size: int | None = None) -> float:
    """Learning rate for an effective batch under a scaling rule: none, linear or sqrt.

    The effective batch is ``batch_size x world_size``; ``lr`` is the rate tuned for
    ``reference_batch_size`` (``train.reference_batch_size``), and the factor is
    ``effective / reference`` (linear) or its square root (sqrt). With no reference (null, the
    default) the reference is one process's batch, so the factor is the world size or its square
    root, as before reference batch sizes existed.

    Linear scaling keeps the SGD trajectory (its noise scale lr/B) when the batch grows (Goyal et
    al. 2017; Granziol et al., "Learning rates as a function of batch size", JMLR 2022, derive it
    from the Hessian spectrum for SGD). For adaptive optimisers such as AdamW, which divide the
    update by a running root-mean-square of the gradient, the matching rule is the square root
    (Granziol et al. 2022; Malladi et al. 2022, "On the SDEs and scaling rules for adaptive
    gradient algorithms", NeurIPS), so ``sqrt`` is the one for molmat's AdamW.

    Args:
        lr: the configured learning rate. world_size: processes.
        rule: ``none``, ``linear`` or ``sqrt``.
        batch_size: per-process batch (needed only with a reference).
        reference_batch_size: the batch ``lr`` was tuned for; None = ``batch_size``.
    Returns:
        The learning rate to use.
    """
    return lr * lr_scale_factor(world_size, rule, batch_size, reference_batch_size)
