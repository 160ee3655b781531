"""Model directories (``best/``): ``config.json`` + ``model.pt`` weights, strict loading.

``config.json`` holds everything needed to rebuild the model and to featurise new inputs the
same way: encoder kind and architecture, head shape, targets with units and transforms, the
featurisation spec and preprocessing config of the training shards, elements seen in training,
and versions. Weights are a plain ``state_dict`` loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import FORMAT_VERSION, MolmatError, __version__
from finetune.model import PropertyModel, TargetSpec

MODEL_FORMAT = "molmat-property-model"


def save_model(model: PropertyModel, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``config.json`` and ``model.pt`` into ``path`` atomically (each file via rename).

    Args:
        model: the trained model (a DDP wrapper is unwrapped).
        path: model directory to create.
        meta: must contain ``model`` (encoder kind + configs), ``finetune`` (head shape),
            ``featurization``, ``preprocess`` and ``elements``.
    """
    model = model.module if hasattr(model, "module") else model
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "code_version": __version__,
              "targets": model.describe(), **meta}
    tmp = out / "model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out / "model.pt")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, out / "config.json")
    return out


def build_model(config: dict[str, Any]) -> PropertyModel:
    """A randomly initialised :class:`PropertyModel` from a model ``config.json`` dict."""
    arch, head = config["model"], config["finetune"]
    return PropertyModel(arch["encoder"], arch["mpnn"], arch["schnet"], [TargetSpec(**t) for t in config["targets"]],
                         head["head_hidden"], head["head_layers"], head["dropout"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PropertyModel:
    """Rebuild a trained model from a model directory (``RUN/best`` or a run directory).

    Returns the model in eval mode with ``model.meta`` holding its ``config.json``.
    Raises:
        MolmatError: not a model directory, or weights that do not fit the architecture.
    """
    p = Path(path)
    if (p / "best" / "config.json").exists():
        p = p / "best"
    cfg_path = p / "config.json"
    if not cfg_path.exists() or not (p / "model.pt").exists():
        raise MolmatError(f"{path}: not a molmat model directory (needs config.json and model.pt)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != MODEL_FORMAT:
        raise MolmatError(f"{cfg_path}: not a property model (format {config.get('format')!r})")
    model = build_model(config)
    state = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MolmatError(f"{p / 'model.pt'}: weights do not fit the architecture in config.json ({exc})") from None
    model.meta = config
    return model.to(device).eval()


#: Featurisation keys that must agree between a model and the shards it reads.
_MUST_MATCH = ("featurization_version", "atom_columns", "bond_columns", "max_z", "molecule_cutoff",
               "crystal_cutoff", "crystal_max_neighbors")


def check_compatible(model_featurization: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """Refuse shards made with a different featurisation, saying what differs."""
    theirs = manifest.get("featurization", {})
    diff = [f"{k}: model {model_featurization.get(k)!r} vs shards {theirs.get(k)!r}"
            for k in _MUST_MATCH if model_featurization.get(k) != theirs.get(k)]
    if diff:
        raise MolmatError(f"{where} was made with a different featurisation than the model: " + "; ".join(diff)
                          + ". Re-run preprocess with the model's settings.")
