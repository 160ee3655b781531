"""``molmat ensemble``: one model directory that averages fine-tuned property models.

The members are trained as usual (``molmat finetune`` with other seeds or encoders, side by side
on the cores of one machine or as separate cluster jobs) and joined afterwards; the ensemble directory is
self-contained (every member's weights inside one ``model.safetensors``) and is evaluated and
used for prediction like a single model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from pipeline import MolmatError
from pipeline.checkpoint import PROPERTY_ENSEMBLE, PROPERTY_MODEL, load_model_dir, resolve_model_dir, save_model_dir
from pipeline.models.ensemble import PropertyEnsemble

log = logging.getLogger("molmat.ensemble")

#: config.json keys of a member that must agree across members for one directory to describe them all.
_SHARED_META = ("featurization", "preprocess", "kinds", "data", "split")
#: config.json keys added by save_model_dir, not part of a member's description.
_DIR_KEYS = ("format", "layout", "format_version", "code_version")


def make_ensemble(members: Sequence[str | Path], out: str | Path) -> PropertyEnsemble:
    """Join fine-tuned property models into one ensemble model directory.

    Args:
        members: two or more run or model directories (``molmat finetune`` outputs).
        out: the ensemble directory to write (``config.json`` + ``model.safetensors``).
    Returns:
        The ensemble (eval mode), as saved.
    Raises:
        MolmatError: fewer than two members, a member that is not a property model, or members
            that were trained on other shards, featurisation, split or targets.
    """
    if len(members) < 2:
        raise MolmatError(f"molmat ensemble needs at least two fine-tuned models, got {len(members)}")
    models = [load_model_dir(m, [PROPERTY_MODEL]) for m in members]
    first = models[0].meta
    for path, m in zip(members[1:], models[1:]):
        for key in _SHARED_META:
            if m.meta.get(key) != first.get(key):
                raise MolmatError(f"{path}: its {key} differs from that of {members[0]}; ensemble members must be "
                                  "fine-tuned on the same shards and split")
    try:
        ens = PropertyEnsemble(models)
    except MolmatError as exc:
        raise MolmatError(f"{', '.join(map(str, members))}: {exc}") from None
    meta: dict[str, Any] = {key: first.get(key) for key in _SHARED_META}
    meta.update({
        "targets": ens.describe(),
        # what a single model's directory says of its training, from member 0 (curvature and
        # prediction read the loss and the elements)
        "finetune": first.get("finetune"), "elements": first.get("elements"), "trained_on": first.get("trained_on"),
        "members": [{k: v for k, v in m.meta.items() if k not in _DIR_KEYS} for m in models],
        "member_dirs": [str(resolve_model_dir(p).resolve()) for p in members],
    })
    save_model_dir(out, ens, PROPERTY_ENSEMBLE, meta)
    log.info("ensemble of %d models written to %s", len(models), out)
    ens.meta = meta
    return ens.eval()
