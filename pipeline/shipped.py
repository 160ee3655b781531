"""Models shipped with molmat, loadable by name (``molmat predict qm9-density mol.xyz --out rho.cube``).

A shipped model is an ordinary model directory (``config.json``, ``model.safetensors`` and a
``CARD.md`` saying what it was trained on and how well it does) under
``pipeline/data/models/<name>/``, installed as package data. Everything that takes a model
directory (:func:`pipeline.checkpoint.load_model_dir`, ``molmat predict``, ``molmat evaluate``)
also takes a shipped model's name, through :func:`resolve_model`.

Names and paths: a path that holds a model directory (or a run directory with ``best/``) always
wins, so a local directory is never hidden by a shipped name; a shipped name is used when no such
directory exists under that name (a stray folder called ``qm9-density`` without a ``config.json``,
e.g. ``qm9-density/eval_test`` from an evaluation, does not hide the shipped model). Anything else
is returned unchanged when it exists (the caller then says what it lacks), or refused with the
list of shipped names.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline import MolmatError

#: Where shipped model directories live (one folder per name). Tests point it elsewhere.
MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
#: What a shipped model's name may look like: no path separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CONFIG = "config.json"


def shipped_models() -> list[str]:
    """Names of the shipped models (folders of :data:`MODELS_DIR` holding a ``config.json``), sorted."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / _CONFIG).is_file())


def shipped_model(name: str) -> Path | None:
    """The directory of the shipped model ``name``, or None when there is none by that name."""
    if not _NAME.fullmatch(name):
        return None
    d = MODELS_DIR / name
    return d if (d / _CONFIG).is_file() else None


def _is_model_dir(p: Path) -> bool:
    return (p / _CONFIG).is_file() or (p / "best" / _CONFIG).is_file()


def resolve_model(name_or_path: str | Path) -> Path:
    """The directory a model argument names: a local model directory, else a shipped model.

    Args:
        name_or_path: a model or run directory, or the name of a shipped model (``qm9-density``).
    Returns:
        The local path when it holds a model (or run) directory; else the shipped model's
        directory when the argument is a shipped name; else the path as given when it exists.
    Raises:
        MolmatError: neither an existing path nor a shipped name; the message lists the shipped
            models.
    """
    p = Path(name_or_path)
    if _is_model_dir(p):
        return p
    shipped = shipped_model(str(name_or_path))
    if shipped is not None:
        return shipped
    if p.exists():
        return p
    names = shipped_models()
    listed = ", ".join(names) if names else "none are installed"
    raise MolmatError(f"{name_or_path}: no such model directory, and not the name of a shipped model (shipped models: "
                      f"{listed})")


def is_shipped_name(name_or_path: str | Path) -> bool:
    """True when :func:`resolve_model` would take the argument as a shipped model's name."""
    return not _is_model_dir(Path(name_or_path)) and shipped_model(str(name_or_path)) is not None
