"""3D Infomax pretraining of the 2D MPNN against 3D encoders.

``from pretrain import load_encoder`` returns a pretrained encoder ready to embed batches::

    enc = load_encoder("ENC")                 # the 2D MPNN (what fine-tuning starts from)
    emb, nodes = enc(batch)                   # batch from pipeline.graphs.collate
    enc3d = load_encoder("ENC", which="3d")   # the SchNet it was aligned with
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from pipeline import MolmatError
from pipeline.models import build_encoder

__all__ = ["load_encoder", "load_encoder_into", "read_encoder_config"]


def read_encoder_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an encoder directory, checked to be one."""
    p = Path(path) / "config.json"
    if not p.exists() or not (Path(path) / "encoder.pt").exists():
        raise MolmatError(f"{path}: not a molmat encoder directory (needs config.json and encoder.pt from `molmat pretrain`)")
    config = json.loads(p.read_text())
    if config.get("format") != "molmat-encoder":
        raise MolmatError(f"{p}: not an encoder (format {config.get('format')!r})")
    return config


def _state(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(Path(path) / "encoder.pt", map_location="cpu", weights_only=True)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_encoder(path: str | Path, which: str = "2d", device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pretrained encoder (``which``: ``"2d"`` MPNN or ``"3d"`` SchNet) in eval mode.

    The module's ``forward(batch)`` returns (graph embeddings (B, out_dim), node states (N, H));
    ``module.meta`` holds the encoder directory's config.
    """
    if which not in ("2d", "3d"):
        raise MolmatError(f"which must be '2d' or '3d', not {which!r}")
    config = read_encoder_config(path)
    kind, key = ("mpnn", "encoder2d.") if which == "2d" else ("schnet", "encoder3d.")
    enc = build_encoder(kind, config["model"][kind])
    enc.load_state_dict(_state(path, key), strict=True)
    enc.meta = config
    return enc.to(device).eval()


def load_encoder_into(model: nn.Module, path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Copy pretrained encoder weights into a property model's encoders; returns what was loaded.

    Raises:
        MolmatError: featurisation or architecture differs from the encoder directory's.
    """
    config = read_encoder_config(path)
    ours, theirs = config["featurization"], manifest.get("featurization", {})
    keys = ["featurization_version", "atom_columns", "bond_columns", "max_z"]
    if getattr(model, "encoder3d", None) is not None:  # the 3D encoder also depends on the neighbour graph
        keys += ["molecule_cutoff", "crystal_cutoff", "crystal_max_neighbors"]
    diff = [f"{k}: encoder {ours.get(k)!r} vs shards {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]
    if diff:
        raise MolmatError(f"{path} was pretrained on another featurisation than the fine-tuning shards: " + "; ".join(diff))
    loaded = []
    for attr, prefix, kind in (("encoder2d", "encoder2d.", "mpnn"), ("encoder3d", "encoder3d.", "schnet")):
        target = getattr(model, attr, None)
        if target is None:
            continue
        try:
            target.load_state_dict(_state(path, prefix), strict=True)
        except RuntimeError as exc:
            raise MolmatError(f"{path}: the pretrained {kind} does not fit the fine-tuning model's {kind} "
                              f"architecture; use the encoder's model.{kind} settings ({str(exc).splitlines()[0]})") from None
        loaded.append(attr)
    return loaded
