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
from pipeline.checkpoint import PROPERTY_MODEL, load_model_dir
from pipeline.graphs import collate
from pipeline.inputs import domain_check, featurized_inputs


def predict(run: str | Path, inputs: list[str], out: str | Path, fmt: str = "auto", batch_size: int = 64,
            device: torch.device | str = "cpu") -> int:
    """Predict every target of a model for raw inputs and write a CSV; returns rows written.

    Columns: ``id``, ``source``, one per target (physical units), ``error`` (why there is no
    prediction) and ``warning`` (a prediction outside the training domain, e.g. a new element).
    """
    device = torch.device(device)
    model = load_model_dir(run, [PROPERTY_MODEL], device)
    names = [t.name for t in model.targets]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source"] + [f"{n}" for n in names] + ["error", "warning"])
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            # Rows keep input order: failed inputs wait in `pending` beside the good ones.
            nonlocal rows
            good = [r for r in pending if "_error" not in r]
            preds: dict[int, list[str]] = {}
            failure = ""
            if good:
                try:
                    values = model.predict(collate(good).to(device)).cpu().numpy()
                    preds = {id(r): [repr(float(v)) for v in p] for r, p in zip(good, values)}
                except (MolmatError, RuntimeError) as exc:
                    failure = f"prediction failed: {exc}"
            for rec in pending:
                error = rec.get("_error") or ("" if id(rec) in preds else failure)
                w.writerow([rec["_id"], rec["_source"]] + preds.get(id(rec), [""] * len(names))
                           + [error, rec.get("_warning", "")])
            rows += len(pending)
            pending.clear()

        for rec in featurized_inputs(inputs, model.meta["preprocess"], fmt):
            if "_error" not in rec:
                error, warning = domain_check(rec, model.meta)
                if error:
                    rec = {"_id": rec["_id"], "_source": rec["_source"], "_error": error}
                elif warning:
                    rec["_warning"] = warning
            pending.append(rec)
            if len(pending) >= batch_size:
                flush()
        flush()
    return rows


