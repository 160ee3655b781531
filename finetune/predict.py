"""``molmat predict``: raw structure files in, one CSV row per structure out.

Inputs are featurised with the preprocessing settings stored in the model, in this process.
A structure that cannot be read gives a row with an ``error`` and empty predictions; the other
rows are written as usual.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator



from pipeline import MolmatError
from pipeline.config import PreprocessConfig
from pipeline.featurize import RecordError, featurize
from pipeline.graphs import collate
from pipeline.readers import open_source
from finetune.io import load_model


def featurized_inputs(inputs: list[str], preprocess: dict[str, Any], fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """Featurise raw inputs; yields records, or ``{"_id", "_source", "_error"}`` for failures."""
    cfg = PreprocessConfig.model_validate({k: v for k, v in preprocess.items() if k in PreprocessConfig.model_fields})
    for path in inputs:
        try:
            reader = open_source(path, fmt)
            records = reader.records()
            for raw in records:
                try:
                    yield featurize(raw, [], cfg)
                except RecordError as exc:
                    yield {"_id": raw.rid, "_source": raw.source, "_error": str(exc)}
        except (MolmatError, OSError, ValueError) as exc:
            yield {"_id": Path(path).stem, "_source": str(path), "_error": str(exc)}


def predict(run: str | Path, inputs: list[str], out: str | Path, fmt: str = "auto", batch_size: int = 64) -> int:
    """Predict every target of a model for raw inputs and write a CSV; returns rows written."""
    model = load_model(run)
    names = [t.name for t in model.targets]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source"] + [f"{n}" for n in names] + ["error"])
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            # Rows keep input order: failed inputs wait in `pending` beside the good ones.
            nonlocal rows
            good = [r for r in pending if "_error" not in r]
            preds: dict[int, list[str]] = {}
            failure = ""
            if good:
                try:
                    values = model.predict(collate(good)).numpy()
                    preds = {id(r): [repr(float(v)) for v in p] for r, p in zip(good, values)}
                except (MolmatError, RuntimeError) as exc:
                    failure = f"prediction failed: {exc}"
            for rec in pending:
                error = rec.get("_error") or ("" if id(rec) in preds else failure)
                w.writerow([rec["_id"], rec["_source"]] + preds.get(id(rec), [""] * len(names)) + [error])
            rows += len(pending)
            pending.clear()

        for rec in featurized_inputs(inputs, model.meta["preprocess"], fmt):
            pending.append(rec)
            if len(pending) >= batch_size:
                flush()
        flush()
    return rows


