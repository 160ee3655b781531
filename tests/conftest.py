"""Shared fixtures: shard directories made once per test session from the shipped samples."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.preprocess import preprocess

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The project's shipped real samples."""
    return DATASETS


@pytest.fixture(scope="session")
def qm9_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300 shipped QM9 molecules (original xyz layout) as a shard directory."""
    out = tmp_path_factory.mktemp("qm9") / "shards"
    preprocess([str(DATASETS / "qm9" / "xyz")], out, load_config(None, ["preprocess.shard_size=128"]), workers=0)
    return out


@pytest.fixture(scope="session")
def mp_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300 shipped Materials Project crystals (CIF + labels.csv) as a shard directory."""
    out = tmp_path_factory.mktemp("mp") / "shards"
    preprocess([str(DATASETS / "mp" / "cifs.tar.gz")], out, load_config(None, ["preprocess.shard_size=128"]), workers=0)
    return out


@pytest.fixture(scope="module")
def mp_records(mp_shards: Path) -> list[dict[str, Any]]:
    """The first 24 real Materials Project records (made again for each test module that asks)."""
    from pipeline.shards import ShardDataset

    ds = ShardDataset(mp_shards)
    return [ds[i] for i in range(24)]
