"""molmat's shared core: config, readers, featurisation, shards, graphs, models, training.

The distribution is called ``molmat``; the import packages are ``pipeline``, ``pretrain`` and
``finetune`` (see DESIGN.md).
"""
from __future__ import annotations

import os

# DGL picks its backend at import time and prints a warning when none is set.
os.environ.setdefault("DGLBACKEND", "pytorch")

__version__ = "0.1.0"

#: Version of the on-disk record layout and shard manifest. Bump on any incompatible change.
FORMAT_VERSION = 1


class MolmatError(Exception):
    """An error the user must fix (bad input, bad config, incompatible directories).

    The CLI prints its message on one line and exits non-zero, without a traceback.
    """
