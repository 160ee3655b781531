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

SMALL = ["model.encoder2d.hidden=16", "model.encoder2d.steps=2", "model.heads.hidden=16", "train.warmup_steps=2",
         "train.log_every=1000", "train.epochs=2", "finetune.targets=[gap_Ha]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (a test sets those itself)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT") and not k.startswith("SLURM_")}
    return dict(base, **extra)


def _sets(items):
    return [x for kv in items for x in ("--set", kv)]


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_process_pretraining_runs(qm9_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                        "-m", "pipeline.cli", "pretrain", "--data", str(qm9_shards), "--out", str(tmp_path / "enc")]
                       + _sets(["model.encoder2d.hidden=16", "model.encoder2d.steps=1", "pretrain.encoder3d.hidden=16",
                                "pretrain.encoder3d.interactions=1", "train.epochs=1", "train.batch_size=32"]),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "enc" / "model.safetensors").exists()
    assert r.stdout.count("pretrain: 1 epoch(s)") == 1, "only rank 0 reports"


@pytest.mark.slow
def test_srun_style_launch_matches_torchrun(qm9_shards, tmp_path):
    """What `srun molmat finetune` starts: N copies of the same command told apart only by SLURM_*."""
    args = ["finetune", "--data", str(qm9_shards)] + _sets(SMALL + ["train.batch_size=16", "train.epochs=1"])
    base = _clean_env()
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


def _template_env(tmp_path, qm9_shards, fakes: dict[str, str], **extra: str) -> dict[str, str]:
    """Environment for an hpc/ training template: stand-in Slurm tools first on PATH, a small fine-tune."""
    from pathlib import Path

    bindir = Path(sys.executable).parent
    if not (bindir / "torchrun").exists() or not (bindir / "molmat").exists():
        pytest.skip("needs the torchrun and molmat scripts of an installed environment")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    fakes = dict(fakes, scontrol=f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    for name, text in fakes.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "local").mkdir()
    sets = " ".join(f"--set {kv}" for kv in SMALL[:-2] + ["train.epochs=40", "finetune.targets=[gap_Ha]",
                                                           "train.batch_size=16", "train.patience=1000"])
    return _clean_env(PATH=f"{fake}:{bindir}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                      DATA=str(qm9_shards), MOLMAT=str(bindir / "molmat"), MOLMAT_ARGS=sets,
                      TMPDIR=str(tmp_path / "local"), **extra)


def _run_template(name, env, on_epoch_1=None, timeout=300):
    """Run hpc/NAME under bash; call ``on_epoch_1(proc)`` once RUN/metrics.csv shows two epochs."""
    import time
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "hpc" / name
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if on_epoch_1 is not None:
        metrics = Path(env["RUN"]) / "metrics.csv"
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") > 2:
                on_epoch_1(proc)
                break
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _assert_same_last_weights(a_dir, b_dir):
    a = torch.load(a_dir / "last.pt", weights_only=True)
    b = torch.load(b_dir / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)


@pytest.mark.slow
def test_single_node_template_requeues_on_signal_and_resumes_to_the_same_weights(qm9_shards, tmp_path):
    """hpc/train_1node.sbatch under bash with torchrun on CPU: signal, requeue, rerun == uninterrupted."""
    import signal

    env = _template_env(tmp_path, qm9_shards, {}, GPUS="2", SLURM_JOB_ID="4242")
    interrupted = dict(env, RUN=str(tmp_path / "run"))
    # what --signal=B:USR1@180 does: USR1 to the batch shell
    rc, out = _run_template("train_1node.sbatch", interrupted, lambda proc: proc.send_signal(signal.SIGUSR1))
    assert rc == 0, out[-3000:]
    assert "requeueing 4242" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]
    assert 1 <= stopped["epoch"] < 40, stopped
    rc, out = _run_template("train_1node.sbatch", interrupted)  # the requeued job: same command, resumes
    assert rc == 0, out[-3000:]
    rc, ref_out = _run_template("train_1node.sbatch", dict(env, RUN=str(tmp_path / "ref")))
    assert rc == 0, ref_out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], "only the signalled run requeues"
    _assert_same_last_weights(tmp_path / "run", tmp_path / "ref")


_TEARDOWN_SCRIPT = '''
import os, sys, torch
from pipeline import distributed
threads = lambda: len(os.listdir("/proc/self/task"))
start = threads()
device = distributed.setup(distributed.detect(), torch.device("cpu"))
class Holder:  # a DDP module in a reference cycle, as the trainer leaves it
    pass
h = Holder()
h.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
h.self = h
h.model(torch.ones(4, 3)).sum().backward()
assert threads() > start
del h
distributed.teardown(barrier=True)
print(f"rank {os.environ['RANK']} threads {start} -> {threads()}")
sys.exit(0 if threads() == start else 3)
'''


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_teardown_joins_gloo_threads_before_interpreter_shutdown(tmp_path):
    """Gloo threads alive at exit abort the process now and then; teardown must stop them."""
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count(" threads ") == 2


_FAKE_SRUN = '''#!/bin/bash
# Stand-in for srun inside an allocation: SLURM_NTASKS copies of the command on this machine,
# told apart by SLURM_PROCID/SLURM_LOCALID; exits with the highest task status, as srun does.
n=${SLURM_NTASKS:-1}
record=1
if [ "$1" = "--ntasks-per-node=1" ]; then n=1; record=0; shift; fi
pids=()
for r in $(seq 0 $((n - 1))); do
    SLURM_PROCID=$r SLURM_LOCALID=$r "$@" &
    pids+=($!)
    [ "$record" -eq 1 ] && echo $! >> "$FAKE_SRUN_PIDS"
done
st=0
for p in "${pids[@]}"; do wait "$p"; s=$?; [ "$s" -gt "$st" ] && st=$s; done
exit $st
'''


@pytest.mark.slow
def test_multinode_template_requeues_when_tasks_are_signalled_and_resumes(qm9_shards, tmp_path):
    """hpc/train_multinode.sbatch with a stand-in srun: USR1 to the tasks, requeue, rerun == uninterrupted."""
    import signal

    env = _template_env(tmp_path, qm9_shards, {"srun": _FAKE_SRUN}, SLURM_JOB_ID="4243", SLURM_NTASKS="2",
                        SLURM_JOB_NODELIST="localhost")

    def run(run_dir, signal_tasks: bool) -> tuple[int, str]:
        pids = tmp_path / f"pids_{run_dir.name}"
        pids.write_text("")

        def usr1_to_tasks(proc):  # what --signal=USR1@180 does: USR1 to every task of the job step
            for pid in pids.read_text().split():
                os.kill(int(pid), signal.SIGUSR1)

        e = dict(env, RUN=str(run_dir), MASTER_PORT=str(_free_port()), FAKE_SRUN_PIDS=str(pids))
        return _run_template("train_multinode.sbatch", e, usr1_to_tasks if signal_tasks else None)

    rc, out = run(tmp_path / "run", signal_tasks=True)
    assert rc == 0 and "requeueing 4243" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4243"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]["epoch"] < 40
    rc, out = run(tmp_path / "run", signal_tasks=False)  # the requeued job resumes
    assert rc == 0, out[-3000:]
    rc, out = run(tmp_path / "ref", signal_tasks=False)
    assert rc == 0, out[-3000:]
    assert "2 processes via slurm" in out
    _assert_same_last_weights(tmp_path / "run", tmp_path / "ref")
