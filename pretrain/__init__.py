"""3D Infomax pretraining of the 2D encoder against a 3D encoder.

``from pretrain import load_encoder`` returns a pretrained encoder ready to embed batches::

    enc = load_encoder("ENC")                 # the 2D encoder (what fine-tuning starts from)
    emb, nodes = enc(batch)                   # batch from pipeline.graphs.collate
    enc3d = load_encoder("ENC", which="3d")   # the 3D encoder it was aligned with
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from pipeline import MolmatError
from pipeline.checkpoint import ENCODER, load_model_dir

__all__ = ["load_encoder"]


def load_encoder(path: str | Path, which: str = "2d", device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pretrained encoder (``which``: ``"2d"`` or ``"3d"``) in eval mode.

    The module's ``forward(batch)`` returns (graph embeddings (B, out_dim), node states (N, H));
    ``module.meta`` holds the encoder directory's config.

    Raises:
        MolmatError: not an encoder directory, or ``which`` is neither 2d nor 3d.
    """
    if which not in ("2d", "3d"):
        raise MolmatError(f"which must be '2d' or '3d', not {which!r}")
    pair = load_model_dir(path, [ENCODER])
    enc = pair.encoder2d if which == "2d" else pair.encoder3d
    enc.meta = pair.meta
    return enc.to(device).eval()
