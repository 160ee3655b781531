"""Small helpers shared by tests (real samples only; corrupt inputs are derived from real files)."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "datasets"


def qm9_files(n: int | None = None) -> list[Path]:
    """Shipped QM9 xyz files in sorted order."""
    files = sorted((DATASETS / "qm9" / "xyz").glob("dsgdb9nsd_*.xyz"))
    return files[:n] if n else files


def mp_cif_texts(n: int | None = None) -> dict[str, str]:
    """Shipped MP CIFs by mp-id (archive order)."""
    out: dict[str, str] = {}
    with tarfile.open(DATASETS / "mp" / "cifs.tar.gz") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".cif"):
                out[m.name[:-4]] = tar.extractfile(m).read().decode()
                if n and len(out) >= n:
                    break
    return out


def stop_mid_epoch(epoch: int, batch: int):
    """A trainer callback that sends the run a SIGTERM at step ``batch`` of ``epoch`` (a preemption)."""
    import signal

    from pipeline.training import Callback

    class StopMidEpoch(Callback):
        def on_step(self, trainer, batch_, loss):
            if trainer.state["epoch"] == epoch and trainer.state["batch_in_epoch"] == batch:
                trainer._stop_signal = signal.SIGTERM

    return StopMidEpoch()


def records_equal(a: dict, b: dict) -> bool:
    """Same keys, same array dtypes/shapes/bytes, same metadata."""
    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], np.ndarray):
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes():
                return False
        elif a[k] != b[k]:
            return False
    return True
