"""Distributed training on CPU with gloo: 2 processes == 1 process on the same global batch."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from pipeline.distributed import DistEnv, detect, first_slurm_host, scaled_lr

SMALL = ["model.mpnn.hidden=16", "model.mpnn.steps=2", "finetune.head_hidden=16", "train.warmup_steps=2",
         "train.log_every=1000", "train.epochs=2", "finetune.targets=[gap_Ha]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(items):
    return [x for kv in items for x in ("--set", kv)]


def test_two_gloo_processes_match_one_process(qm9_shards, tmp_path):
    one = subprocess.run([sys.executable, "-m", "pipeline.cli", "finetune", "--data", str(qm9_shards), "--out",
                          str(tmp_path / "one")] + _sets(SMALL + ["train.batch_size=32"]), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "pipeline.cli", "finetune", "--data", str(qm9_shards),
                          "--out", str(tmp_path / "two")] + _sets(SMALL + ["train.batch_size=16"]),
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "effective batch size 32 (16 per process x 2)" in two.stderr
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 16
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert not (tmp_path / "two" / "metrics.csv").read_text().count("\n") > 3, "only rank 0 writes metrics"
    # each rank validates half of the batches; the reduced metric is the single-process one
    rows = [list(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("one", "two")]
    for r1, r2 in zip(*rows):
        assert float(r1["val_mae_gap_Ha"]) == pytest.approx(float(r2["val_mae_gap_Ha"]), rel=1e-4)


def test_launcher_detection(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert detect() == DistEnv()
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-006,9],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env = detect()
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.launcher) == (5, 1, 8, "gpu003", "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect().launcher == "torchrun"
    assert first_slurm_host("node17") == "node17"
    assert scaled_lr(1e-3, 4, "linear") == 4e-3 and scaled_lr(1e-3, 4, "sqrt") == 2e-3 and scaled_lr(1e-3, 4, "none") == 1e-3


def test_two_process_pretraining_runs(qm9_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                        "-m", "pipeline.cli", "pretrain", "--data", str(qm9_shards), "--out", str(tmp_path / "enc")]
                       + _sets(["model.mpnn.hidden=16", "model.mpnn.steps=1", "model.schnet.hidden=16",
                                "model.schnet.interactions=1", "train.epochs=1", "train.batch_size=32"]),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "enc" / "encoder.pt").exists()
    assert r.stdout.count("pretrain: 1 epoch(s)") == 1, "only rank 0 reports"


def test_srun_style_launch_matches_torchrun(qm9_shards, tmp_path):
    """What `srun molmat finetune` starts: N copies of the same command told apart only by SLURM_*."""
    args = ["finetune", "--data", str(qm9_shards)] + _sets(SMALL + ["train.batch_size=16", "train.epochs=1"])
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT") and not k.startswith("SLURM_")}
    slurm = dict(base, OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                 SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))  # without MASTER_PORT: 20000 + job id % 20000
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--out", str(tmp_path / "srun")],
                              env=dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "2 processes via slurm" in outs[0][1]
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "pipeline.cli", *args, "--out", str(tmp_path / "tr")],
                         capture_output=True, text=True, env=dict(base, OMP_NUM_THREADS="1"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    a = torch.load(tmp_path / "srun" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "tr" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
