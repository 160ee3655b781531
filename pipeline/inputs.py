"""Raw structure files featurised for a trained model (prediction, embedding), with reasons for failures.

Unlike preprocessing, nothing is written to shards: each input structure becomes either a
featurised record or a failure that names the structure and why, so a caller can write one output
row per input, always, in input order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipeline import MolmatError
from pipeline.config import PreprocessConfig
from pipeline.featurize import RecordError, featurize
from pipeline.readers import open_input

#: Keys of a failure item (a record that could not be featurised).
ERROR = "_error"
WARNING = "_warning"


def featurized_inputs(inputs: list[str], preprocess: dict[str, Any], fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """Featurise raw inputs with a model's own preprocessing settings.

    Args:
        inputs: files, directories or archives in any format :mod:`pipeline.readers` reads.
        preprocess: the ``preprocess`` config a model was trained with (from its ``config.json``).
        fmt: input format, or ``auto`` to detect it from each file name.
    Yields:
        Featurised records (see :mod:`pipeline.featurize`), or ``{"_id", "_source", "_error"}``
        for an input that cannot be used (one per structure when the file is readable, one per
        file, or per unreadable rest of a file, otherwise), in input order. Never raises for
        bad input: any error featurising a structure (a MemoryError, a RecursionError, a bug)
        becomes its error.
    """
    cfg = PreprocessConfig.model_validate({k: v for k, v in preprocess.items() if k in PreprocessConfig.model_fields})
    for path in inputs:
        try:
            reader = open_input(path, fmt)  # unreadable content comes back as records with a reason
        except (MolmatError, OSError, ValueError) as exc:
            yield {"_id": Path(path).stem, "_source": str(path), ERROR: str(exc)}
            continue
        for raw in reader.records():
            try:
                yield featurize(raw, [], cfg)
            except RecordError as exc:
                yield {"_id": raw.rid, "_source": raw.source, ERROR: str(exc)}
            except Exception as exc:  # one structure must not cost the rows of the others
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                yield {"_id": raw.rid, "_source": raw.source,
                       ERROR: f"could not be featurised ({type(exc).__name__}: {first})"}


def domain_check(rec: dict[str, Any], meta: dict[str, Any]) -> tuple[str, str]:
    """(error, warning) for a featurised record against what a model was trained on.

    A molecule given to a crystal model (or the reverse) is an error: the prediction would be
    meaningless. Elements the model never saw in training give a prediction with a warning.

    Args:
        rec: a featurised record.
        meta: the model directory's ``config.json`` (``kinds``, ``elements``).
    """
    kinds = meta.get("kinds")
    kind = str(rec.get("_kind", ""))
    if kinds and kind and kind not in kinds:
        return f"model was trained on {' and '.join(k + 's' for k in kinds)}, this input is a {kind}", ""
    seen = meta.get("elements")
    if seen:
        from pipeline.featurize import symbol_of

        unseen = sorted({symbol_of(int(z)) for z in rec["z"]} - set(seen))
        if unseen:
            return "", f"element(s) {', '.join(unseen)} not in the training data; the prediction is an extrapolation"
    return "", ""
