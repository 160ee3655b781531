"""Output files that are whole or absent, and environment errors that read as one line.

:func:`atomic_file` writes under a temporary name and renames on success, so a full disk or a
kill never leaves a half-written (or empty) output under its final name, and a failed write
removes its temporary file. :func:`environment_error` turns an ``OSError`` (disk full, read-only
or missing directory, a file where a directory belongs) into a :class:`~pipeline.MolmatError`
whose one line names the path and what to do; the CLI uses it for every command.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import IO, Any, Iterator

from pipeline import MolmatError


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open ``path.tmp`` for writing; on success rename it to ``path``, on failure remove it.

    Args:
        path: the final file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        kwargs: passed to :func:`open` (``newline=""`` for CSV).
    Yields:
        The open temporary file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: errno -> what to do about it.
_ADVICE = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "a file size limit was reached (ulimit -f); write elsewhere or raise the limit",
    errno.EROFS: "the filesystem is read-only; write elsewhere",
    errno.EACCES: "choose a location you may write to (or read)",
    errno.EPERM: "choose a location you may write to",
    errno.ENOTDIR: "a file stands where a directory is needed; choose another path",
    errno.EEXIST: "a file stands where a directory is needed; choose another path",
    errno.EISDIR: "a directory stands where a file is needed; give a file name",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "raise the limit of open files (ulimit -n)",
    errno.ENOMEM: "use a machine with more memory or smaller inputs",
}


def environment_error(exc: OSError, doing: str = "") -> MolmatError:
    """A one-line :class:`MolmatError` for an ``OSError``: the path, the error and what to do.

    Args:
        exc: the error (``filename`` names the path when the OS said which).
        doing: optional context ("writing predictions").
    """
    path = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    advice = _ADVICE.get(exc.errno or -1)
    what = exc.strerror or str(exc) or type(exc).__name__
    parts = [f"{path}: " if path else "", f"{doing}: " if doing else "", what]
    if advice:
        parts.append(f" ({advice})")
    return MolmatError("".join(parts))
