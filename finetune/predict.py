"""``molmat predict``: raw structure files in, one CSV row per structure out.

Inputs are featurised with the preprocessing settings stored in the model, in this process.
A structure that cannot be read gives a row with an ``error`` and empty predictions; the other
rows are written as usual.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from pipeline import MolmatError
from pipeline.checkpoint import PROPERTY_MODELS, load_model_dir
from pipeline.files import atomic_file
from pipeline.graphs import collate
from pipeline.inputs import ERROR, WARNING, domain_check, featurized_inputs
from pipeline.readers import unit_column


def predict(run: str | Path, inputs: list[str], out: str | Path, fmt: str = "auto", batch_size: int = 64,
            device: torch.device | str = "cpu") -> int:
    """Predict every target of a model for raw inputs and write a CSV; returns rows written.

    Columns: ``id`` (the structure's id: file stem, mp-id, QM9 index, id field of an ASE frame,
    row number of a SMILES CSV, ...), ``source`` (its file, ``archive::member`` or ``file[frame]``),
    one per target in physical units, named with the unit (the target's name when it ends with
    its unit, ``gap_Ha``; else ``name [unit]``, see :func:`pipeline.readers.unit_column`), ``error``
    (why there is no prediction) and ``warning`` (a prediction outside the training domain, e.g.
    a new element).
    """
    device = torch.device(device)
    model = load_model_dir(run, PROPERTY_MODELS, device)
    names = [unit_column(t.name, t.unit) for t in model.targets]
    out = Path(out)
    if out.is_dir():  # found now, not after every prediction is made
        raise MolmatError(f"{out}: is a directory; --out names the CSV file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    # written under a temporary name: a failure (a full disk) leaves no half or empty CSV behind
    with atomic_file(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source"] + names + ["error", "warning"])
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            # Rows keep input order: failed inputs wait in `pending` beside the good ones.
            nonlocal rows
            good = [r for r in pending if ERROR not in r]
            preds: dict[int, list[str]] = {}
            failures: dict[int, str] = {}
            if good:
                try:
                    values = model.predict(collate(good, model.views()).to(device)).cpu().numpy()
                    preds = {id(r): [repr(float(v)) for v in p] for r, p in zip(good, values)}
                except Exception:  # noqa: BLE001 (DGL and torch raise many types)
                    # one by one, so that one structure costs only its own row
                    for rec in good:
                        try:
                            value = model.predict(collate([rec], model.views()).to(device)).cpu().numpy()[0]
                            preds[id(rec)] = [repr(float(v)) for v in value]
                        except Exception as exc:  # noqa: BLE001
                            failures[id(rec)] = f"prediction failed ({type(exc).__name__}: {_first_line(exc)})"
            for rec in pending:
                error = rec.get(ERROR) or failures.get(id(rec), "")
                w.writerow([rec["_id"], rec["_source"]] + preds.get(id(rec), [""] * len(names))
                           + [error, rec.get(WARNING, "")])
            rows += len(pending)
            pending.clear()

        for rec in featurized_inputs(inputs, model.meta["preprocess"], fmt):
            if ERROR not in rec:
                error, warning = domain_check(rec, model.meta)
                if error:
                    rec = {"_id": rec["_id"], "_source": rec["_source"], ERROR: error}
                elif warning:
                    rec[WARNING] = warning
            pending.append(rec)
            if len(pending) >= batch_size:
                flush()
        flush()
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


