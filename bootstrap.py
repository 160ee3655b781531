#!/usr/bin/env python3
"""Set up molmat in ./.venv (if needed) and run it or its tests.

Usage::

    python3.11 bootstrap.py run    # install, then `molmat run` on the shipped samples
    python3.11 bootstrap.py test   # install, then the test suite (what CI runs)

Only the standard library is used here, so this works on a machine that has nothing but
Python 3.11. The install is skipped when pyproject.toml and constraints.txt have not changed
since the last successful one.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".molmat-install-stamp"


def _venv_python() -> Path:
    """Path of the virtual environment's interpreter."""
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _install_fingerprint() -> str:
    """Hash of what decides the install: pyproject, constraints and the list of packages.

    The package list matters because an editable install maps each top-level package when it
    is made; a package added later (a new `pretrain/`) is invisible to the `molmat` console
    script until pip re-runs.
    """
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    for pkg in sorted(d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()):
        h.update(pkg.encode())
    return h.hexdigest()


def ensure_environment() -> Path:
    """Create .venv and install molmat with its pinned dependencies; return the interpreter."""
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"bootstrap.py: molmat needs Python 3.11 (dgl 2.1.0 / torch 2.2.1); this is {sys.version.split()[0]}")
    py = _venv_python()
    if not py.exists():
        print(f"bootstrap: creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return py
    print("bootstrap: installing molmat and its pinned stack (torch is ~5 GB; a few minutes)", flush=True)
    free = _free_gb()
    if free < INSTALL_GB:
        print(f"bootstrap: warning: {free:.1f} GB free on the disk of {VENV}; the install needs about "
              f"{INSTALL_GB:.0f} GB (torch 2.2.1 brings its CUDA libraries)", file=sys.stderr, flush=True)
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    try:
        subprocess.run(pip + ["install", "-q", "setuptools<70", "wheel"], check=True)
        # the density extra (PySCF) too: its label generator is tested against reference densities
        subprocess.run(pip + ["install", "-q", "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev,density]"],
                       check=True)
    except subprocess.CalledProcessError as err:
        sys.exit(f"bootstrap: pip failed (exit {err.returncode}); {_free_gb():.1f} GB free on the disk of {VENV} "
                 f"(the install needs about {INSTALL_GB:.0f} GB). Run `python3.11 bootstrap.py setup` again "
                 "once the cause above is fixed: it resumes.")
    STAMP.write_text(fingerprint)
    return py


#: Disk the install needs, GB: the finished .venv is 5.9 GB (torch 1.5, its CUDA libraries 2.8, triton
#: 0.4), plus pip's unpacking space. Measured on 2026-11-24; a CI run on a full disk died in pip with
#: "No space left on device", which this makes plain.
INSTALL_GB = 8.0


def _free_gb() -> float:
    """Free space (GB) on the file system that holds the virtual environment."""
    return shutil.disk_usage(ROOT).free / 1e9


def main(argv: list[str]) -> int:
    """Entry point: `run` or `test`, extra arguments passed on."""
    if not argv or argv[0] not in {"run", "test", "setup"}:
        print(__doc__)
        return 2
    py = ensure_environment()
    env = dict(os.environ, DGLBACKEND="pytorch")
    if argv[0] == "setup":
        return 0
    if argv[0] == "run":
        cmd = [str(py), "-m", "pipeline.cli", "run", *argv[1:]]
    else:
        # every test, the slow ones (torchrun, sbatch templates, signals) included;
        # `pytest -m "not slow"` is the fast subset for development
        cmd = [str(py), "-m", "pytest", "-q", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
