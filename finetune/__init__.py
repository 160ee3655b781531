"""Property heads on (pretrained) encoders: fine-tuning, evaluation, prediction.

``from finetune import load_model`` rebuilds a trained model from its directory.
"""
from __future__ import annotations

from pathlib import Path

import torch

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from pipeline.checkpoint import PROPERTY_MODELS, load_model_dir
from pipeline.models.ensemble import PropertyEnsemble
from pipeline.models.property import PropertyModel

__all__ = ["load_model", "PropertyModel", "PropertyEnsemble"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PropertyModel | PropertyEnsemble:
    """Rebuild a trained property model from its directory (``RUN/best``, or the run directory), or
    an ensemble of them (``molmat ensemble``), which predicts through the same calls.

    Returns the model in eval mode with ``model.meta`` holding its ``config.json``; it predicts in
    physical units with ``model.predict(batch)`` (batch from :func:`pipeline.graphs.collate`).

    Raises:
        MolmatError: not a property-model directory, or weights that do not fit it.
    """
    return load_model_dir(path, PROPERTY_MODELS, device)
