"""Encoders: the 2D message-passing network and the 3D continuous-filter network.

Both take a :class:`pipeline.graphs.GraphBatch` and return ``(graph embeddings (B, out_dim), node
states (N, node_dim))``. :func:`build_encoder` picks one by name from :data:`ENCODERS`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from pipeline import MolmatError
from pipeline.config import _format_validation_error
from pipeline.models.mpnn import MPNN, MPNNConfig
from pipeline.models.schnet import SchNet, SchNetConfig

#: Encoder name -> (module class, config class).
ENCODERS: dict[str, tuple[type[nn.Module], type[BaseModel]]] = {
    "mpnn": (MPNN, MPNNConfig),
    "schnet": (SchNet, SchNetConfig),
}

__all__ = ["ENCODERS", "MPNN", "MPNNConfig", "SchNet", "SchNetConfig", "build_encoder"]


def build_encoder(kind: str, cfg: dict[str, Any] | BaseModel | None = None) -> nn.Module:
    """Build the encoder named ``kind`` from its config.

    Args:
        kind: a key of :data:`ENCODERS` (``"mpnn"``, ``"schnet"``).
        cfg: the encoder's config object, or plain data validated into it (None = defaults).
    Returns:
        The encoder module (randomly initialised).
    Raises:
        MolmatError: unknown kind, or a config with unknown keys or bad values.
    """
    if kind not in ENCODERS:
        raise MolmatError(f"unknown encoder '{kind}'; valid kinds: {', '.join(sorted(ENCODERS))}")
    module_cls, cfg_cls = ENCODERS[kind]
    if not isinstance(cfg, cfg_cls):
        data = cfg.model_dump() if isinstance(cfg, BaseModel) else (cfg or {})
        try:
            cfg = cfg_cls.model_validate(data)
        except ValidationError as exc:
            raise MolmatError(_format_validation_error(exc, f"{kind} encoder config")) from None
    return module_cls(cfg)
