"""A trained property model together with the shard records it is scored on.

:func:`open_model_on_split` is what every stage that scores a model on shards starts from
(``evaluate`` now; curvature and density next): the model directory, the compatibility check
against the shards, the split, and the model's target columns.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import MolmatError
from pipeline.checkpoint import PROPERTY_MODELS, check_shards_fit, load_model_dir
from pipeline.graphs import collate
from pipeline.loader import make_loader
from pipeline.models.property import PropertyModel, TargetSpec
from pipeline.shards import ShardDataset, load_manifest
from pipeline.splits import load_split

SPLITS = ("train", "val", "test", "all")


class TargetColumns:
    """A dataset view whose records keep only some target columns of ``y``, in a given order.

    Args:
        base: the records (e.g. a :class:`ShardDataset`).
        columns: index into the record's ``y`` of each kept target.
    """

    def __init__(self, base: Any, columns: Sequence[int]) -> None:
        self.base, self.columns = base, np.asarray(columns, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.base[i]
        rec["y"] = rec["y"][self.columns]
        return rec


def target_columns(manifest: dict[str, Any], specs: Sequence[TargetSpec], where: str) -> list[int]:
    """Column of each target in the shards' ``y``.

    Raises:
        MolmatError: a target the shards have no labels for.
    """
    names = [t["name"] for t in manifest["targets"]]
    missing = [s.name for s in specs if s.name not in names]
    if missing:
        raise MolmatError(f"{where} has no labels for {', '.join(missing)}; it holds {', '.join(names) or 'no targets'}")
    return [names.index(s.name) for s in specs]


@torch.no_grad()
def predict_loader(model: PropertyModel, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Physical-unit predictions over a loader of :class:`GraphBatch`.

    Returns:
        ``pred``, ``y`` (n, T) float64, ``mask`` (n, T) bool, ``ids`` and ``index`` (n lists).
    """
    model.eval()
    preds, ys, masks, ids, index = [], [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        preds.append(model.predict(batch).cpu().numpy())
        ys.append(batch.y.double().cpu().numpy())
        masks.append(batch.mask.cpu().numpy())
        ids += batch.ids
        index += batch.index
    t = len(model.targets)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, t))  # noqa: E731
    return {"pred": cat(preds), "y": cat(ys), "mask": cat(masks).astype(bool), "ids": ids, "index": index}


@dataclass
class ModelOnSplit:
    """A loaded model and the records of one split of a shard directory, with its target columns.

    Attributes:
        model: the property model (eval mode, on ``device``); ``model.meta`` is its config.json.
        dataset: the split's records, ``y`` reduced to the model's targets in its order.
        manifest: the shard directory's manifest.
        split: ``train``, ``val``, ``test`` or ``all``.
        device: where the model is.
    """

    model: PropertyModel
    dataset: TargetColumns
    manifest: dict[str, Any]
    split: str
    device: torch.device

    def loader(self, batch_size: int = 128, num_workers: int = 0) -> DataLoader:
        """Batches of the split in record order."""
        return make_loader(self.dataset, batch_size, num_workers=num_workers,
                           collate_fn=functools.partial(collate, views=self.model.views()))


def default_eval_out(run: str | Path, split: str) -> Path:
    """Where ``molmat evaluate`` writes by default: ``RUN/eval_<split>``, or ``./eval_<name>_<split>``
    for a shipped model's name (it has no run directory of its own to write into)."""
    from pipeline.shipped import is_shipped_name

    return Path(f"eval_{run}_{split}") if is_shipped_name(str(run)) else Path(run) / f"eval_{split}"


def split_indices(data: str | Path, split: str, limit: int | None = None) -> list[int] | None:
    """Record indices of a split of a shard directory, optionally only its first ``limit``.

    Args:
        data: shard directory.
        split: ``train``, ``val``, ``test`` or ``all`` (every record).
        limit: keep the first N records of the split (None: all of them).
    Returns:
        the indices, or None for every record (``all`` without a limit).
    Raises:
        MolmatError: an unknown split or a limit below 1.
    """
    if split not in SPLITS:
        raise MolmatError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if limit is not None and limit < 1:
        raise MolmatError(f"--limit must be at least 1, not {limit}")
    indices = None if split == "all" else list(load_split(data)[split])
    if limit is None:
        return indices
    if indices is None:
        indices = list(range(len(ShardDataset(data))))
    return indices[:limit]


def open_model_on_split(run: str | Path, data: str | Path, split: str = "test",
                        device: torch.device | str = "cpu", limit: int | None = None,
                        kinds: Sequence[str] = PROPERTY_MODELS) -> ModelOnSplit:
    """Load a property model and the records of a split it can read.

    Args:
        run: run or model directory.
        data: shard directory.
        split: ``train``, ``val``, ``test`` or ``all`` (every record).
        device: where to put the model.
        limit: only the first N records of the split.
        kinds: model directory formats accepted (a property model or an ensemble of them).
    Raises:
        MolmatError: not a property model, shards of another featurisation, missing labels,
            unknown or empty split.
    """
    indices = split_indices(data, split, limit)
    device = torch.device(device)
    model = load_model_dir(run, kinds, device)
    manifest = load_manifest(data)
    check_shards_fit(model.meta["featurization"], model.views(), manifest, str(data))
    columns = target_columns(manifest, model.targets, str(data))
    ds = TargetColumns(ShardDataset(data, indices), columns)
    if len(ds) == 0:
        raise MolmatError(f"{data}: the {split} split is empty")
    return ModelOnSplit(model, ds, manifest, split, device)
