"""Shared helper of the benchmark scripts: the first N structures of a real archive as a directory."""
from __future__ import annotations

import csv
import shutil
import tarfile
from pathlib import Path


def subset_tar(src: Path, out: Path, n: int, suffix: str, labels: Path | None = None) -> Path:
    """First ``n`` members ending in ``suffix`` of a tar archive (archive order) into ``out``.

    With ``labels``, the rows of that CSV whose first column is one of the extracted stems go to
    ``out/labels.csv``. ``out/SUBSET.txt`` says what was taken; a finished subset is reused.
    """
    done = out / ".complete"
    if done.exists() and done.read_text() == f"{src} {n}\n":
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stems = []
    with tarfile.open(src, "r:*") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(suffix)):
                continue
            name = Path(m.name).name
            (out / name).write_bytes(tar.extractfile(m).read())
            stems.append(name[: -len(suffix)])
            if len(stems) >= n:
                break
    rows = 0
    if labels is not None:
        keep = set(stems)
        with open(labels, newline="") as fh, open(out / "labels.csv", "w", newline="") as fo:
            r, w = csv.reader(fh), csv.writer(fo)
            w.writerow(next(r))
            for row in r:
                if row and row[0] in keep:
                    w.writerow(row)
                    rows += 1
    (out / "SUBSET.txt").write_text(f"first {len(stems)} {suffix} members of {src} in archive order "
                                    f"({stems[0]} .. {stems[-1]}); {rows} matching label rows\n")
    done.write_text(f"{src} {n}\n")
    return out
