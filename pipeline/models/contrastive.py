"""The 3D Infomax model: a 2D encoder and a 3D encoder, each with a projection head.

Pretraining (:mod:`pretrain`) trains it with a contrastive loss; an encoder directory stores it
whole, and users load either encoder from it. It lives in ``pipeline`` because loading an
encoder directory is a model-directory concern shared by every stage.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import build_encoder

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pipeline.graphs import GraphBatch


def _projection(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class ContrastiveModel(nn.Module):
    """2D and 3D encoders with projection heads.

    Args:
        encoder2d_cfg: config of the 2D encoder (a ``view == "2d"`` encoder).
        encoder3d_cfg: config of the 3D encoder it is aligned with.
        proj_hidden, proj_dim: projection head widths.
    ``forward(graphs, views)`` returns (z2d (B, proj_dim), z3d (M, proj_dim)), L2-normalised.
    """

    def __init__(self, encoder2d_cfg: BaseModel | dict[str, Any], encoder3d_cfg: BaseModel | dict[str, Any],
                 proj_hidden: int, proj_dim: int) -> None:
        super().__init__()
        self.encoder2d = build_encoder(encoder2d_cfg)
        self.encoder3d = build_encoder(encoder3d_cfg)
        self.proj2d = _projection(self.encoder2d.out_dim, proj_hidden, proj_dim)
        self.proj3d = _projection(self.encoder3d.out_dim, proj_hidden, proj_dim)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ContrastiveModel":
        """A randomly initialised model from an encoder directory's ``config.json`` (current layout).

        Args:
            config: plain data with ``model.encoder2d``, ``model.encoder3d`` (encoder configs
                with a ``name``) and ``pretrain.proj_hidden``, ``pretrain.proj_dim``.
        """
        return cls(config["model"]["encoder2d"], config["model"]["encoder3d"], config["pretrain"]["proj_hidden"],
                   config["pretrain"]["proj_dim"])

    def forward(self, graphs: GraphBatch, views: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and normalise.

        Args:
            graphs: batch of B structures (the 2D encoder reads it).
            views: batch of M >= B 3D views of them (the 3D encoder reads it).
        Returns:
            (B, proj_dim) 2D and (M, proj_dim) 3D embeddings, unit length.
        """
        z2 = self.proj2d(self.encoder2d(graphs)[0])
        z3 = self.proj3d(self.encoder3d(views)[0])
        return F.normalize(z2, dim=-1), F.normalize(z3, dim=-1)
