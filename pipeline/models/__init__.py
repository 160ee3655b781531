"""Encoders and the models built on them.

Every encoder takes a :class:`pipeline.graphs.GraphBatch` and returns ``(graph embeddings (B,
out_dim), node states (N, node_dim))``; its config class (in :mod:`pipeline.config`) carries a
``name`` and the graph ``view`` it reads (``"2d"`` or ``"3d"``). :data:`ENCODERS` maps each name
to its module and config class; :func:`build_encoder` builds one from its config.

Adding an encoder touches its module here, its config class (and one entry in
``pipeline.config.EncoderConfig``), one line of :data:`ENCODERS`, and its defaults in config.yaml.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from pipeline import MolmatError
from pipeline.config import _format_validation_error
from pipeline.models.mpnn import MPNN, MPNNConfig
from pipeline.models.painn import PaiNN, PaiNNConfig
from pipeline.models.schnet import SchNet, SchNetConfig

#: Encoder name -> (module class, config class).
ENCODERS: dict[str, tuple[type[nn.Module], type[BaseModel]]] = {
    "mpnn": (MPNN, MPNNConfig),
    "schnet": (SchNet, SchNetConfig),
    "painn": (PaiNN, PaiNNConfig),
}

__all__ = ["ENCODERS", "MPNN", "MPNNConfig", "PaiNN", "PaiNNConfig", "SchNet", "SchNetConfig", "build_encoder", "encoder_config",
           "check_encoder_cutoff"]


def encoder_config(spec: str | BaseModel | dict[str, Any] | None, cfg: BaseModel | dict[str, Any] | None = None) -> BaseModel:
    """Validate an encoder's config.

    Args:
        spec: an encoder config object; or plain data with a ``name``; or an encoder name, with
            ``cfg`` its settings (plain data or config object; None = defaults).
        cfg: settings when ``spec`` is a name.
    Returns:
        The config object of the named encoder.
    Raises:
        MolmatError: unknown encoder name, unknown keys or bad values.
    """
    if isinstance(spec, str):
        name, data = spec, cfg
    elif isinstance(spec, BaseModel):
        name, data = getattr(spec, "name", None), spec
    elif isinstance(spec, dict):
        name, data = spec.get("name"), spec
    else:
        raise MolmatError(f"an encoder config needs a name ({', '.join(sorted(ENCODERS))}), got {spec!r}")
    if name not in ENCODERS:
        raise MolmatError(f"unknown encoder '{name}'; valid names: {', '.join(sorted(ENCODERS))}")
    cfg_cls = ENCODERS[name][1]
    if isinstance(data, cfg_cls):
        return data
    plain = data.model_dump() if isinstance(data, BaseModel) else dict(data or {})
    plain["name"] = name
    try:
        return cfg_cls.model_validate(plain)
    except ValidationError as exc:
        raise MolmatError(_format_validation_error(exc, f"{name} encoder config")) from None


def build_encoder(spec: str | BaseModel | dict[str, Any] | None, cfg: BaseModel | dict[str, Any] | None = None) -> nn.Module:
    """Build a randomly initialised encoder from its config (see :func:`encoder_config` for the arguments).

    Returns:
        The encoder module; ``module.cfg`` is its validated config.
    """
    config = encoder_config(spec, cfg)
    return ENCODERS[config.name][0](config)


def check_encoder_cutoff(cfg: BaseModel, stored_cutoff: float, where: str) -> None:
    """Refuse an encoder that looks further than the neighbour graph the shards store.

    Args:
        cfg: an encoder config; encoders without a ``cutoff`` setting pass.
        stored_cutoff: the shards' neighbour cutoff for the kinds present (Angstrom), from
            :func:`pipeline.featurize.neighbour_cutoff`.
        where: what to name in the message (shard directories).
    Raises:
        MolmatError: the encoder's cutoff exceeds the stored one.
    """
    cutoff = getattr(cfg, "cutoff", None)
    if cutoff is not None and cutoff > stored_cutoff + 1e-9:
        raise MolmatError(f"{cfg.name} cutoff {cutoff} A exceeds the neighbour cutoff {stored_cutoff} A of {where}; "
                          "lower the model cutoff or preprocess again with a larger cutoff")
