"""``molmat embed``: embeddings of raw structures from an encoder or a fine-tuned model."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline import MolmatError
from pipeline.checkpoint import ENCODER, PROPERTY_MODEL, load_model_dir
from pipeline.files import atomic_file
from pipeline.graphs import GraphBatch, collate
from pipeline.inputs import ERROR, featurized_inputs


def _embedder(path: str | Path, which: str, device: torch.device) -> tuple[Callable[[GraphBatch], torch.Tensor], dict[str, Any]]:
    """(batch -> (B, D) embeddings, preprocess config) for an encoder or property-model directory."""
    model = load_model_dir(path, [ENCODER, PROPERTY_MODEL], device)
    if model.meta["format"] == ENCODER:
        enc = model.encoder2d if which == "2d" else model.encoder3d
        return (lambda b: enc(b.to(device))[0]), model.meta["preprocess"]
    return (lambda b: model.embed(b.to(device))), model.meta["preprocess"]


@torch.no_grad()
def embed(path: str | Path, inputs: list[str], out: str | Path, which: str = "2d", fmt: str = "auto",
          batch_size: int = 64, device: torch.device | str = "cpu") -> int:
    """Write one embedding per input structure to ``out`` (``.npz`` or ``.csv``); returns the count.

    ``.npz`` holds ``ids``, ``sources``, ``errors`` (empty string when fine) as unicode arrays and
    ``embeddings`` (n, D) float32 (NaN rows for inputs that failed); it loads with
    ``np.load(allow_pickle=False)``. ``which`` picks the 2D or 3D encoder of an encoder
    directory; a property model gives its (concatenated) pooled embedding.
    """
    if which not in ("2d", "3d"):
        raise MolmatError(f"which must be '2d' or '3d', not {which!r}")
    fn, preprocess = _embedder(path, which, torch.device(device))
    ids, sources, errors, rows = [], [], [], []
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        if not pending:
            return
        emb = fn(collate([r for _, r in pending])).float().cpu().numpy()
        for (slot, _), e in zip(pending, emb):
            rows[slot] = e
        pending.clear()

    for rec in featurized_inputs(inputs, preprocess, fmt):
        ids.append(str(rec["_id"]))
        sources.append(str(rec["_source"]))
        errors.append(rec.get(ERROR, ""))
        rows.append(None)
        if ERROR not in rec:
            pending.append((len(rows) - 1, rec))
            if len(pending) >= batch_size:
                flush()
    flush()
    width = next((len(r) for r in rows if r is not None), 0)
    if width == 0 and rows:
        raise MolmatError("no input could be embedded: " + "; ".join(sorted(set(errors)))[:500])
    matrix = np.stack([r if r is not None else np.full(width, np.nan, np.float32) for r in rows]) if rows else np.zeros((0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name: a failure (a full disk) leaves no half file behind
    if out.suffix == ".csv":
        with atomic_file(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "source", "error"] + [f"e{i}" for i in range(width)])
            for i in range(len(ids)):
                w.writerow([ids[i], sources[i], errors[i]] + ([repr(float(v)) for v in matrix[i]] if not errors[i] else [""] * width))
    else:
        with atomic_file(out, "wb") as fh:  # a file object: np.savez would append .npz to a .tmp name
            np.savez(fh, ids=np.array(ids, dtype=str), sources=np.array(sources, dtype=str),
                     errors=np.array(errors, dtype=str), embeddings=matrix.astype(np.float32))
    return len(ids)
