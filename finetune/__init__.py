"""Property heads on (pretrained) encoders: fine-tuning, evaluation, prediction.

``from finetune import load_model`` rebuilds a trained model from its directory.
"""
from __future__ import annotations

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
from finetune.io import load_model

__all__ = ["load_model"]
