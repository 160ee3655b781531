"""Config schema: unknown keys and wrong types are rejected by name; --set overrides; resolved copies."""
from __future__ import annotations

import pytest
import yaml

from pipeline import MolmatError
from pipeline.config import load_config, write_resolved


def test_default_config_loads_and_has_every_stage():
    cfg = load_config()
    assert cfg.preprocess.crystal.cutoff == 8.0
    assert cfg.run.datasets, "the shipped config must run on the shipped samples"


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("preprocess:\n  crystal:\n    cutof: 6\n")
    with pytest.raises(MolmatError, match=r"unknown key 'preprocess\.crystal\.cutof'"):
        load_config(bad)


def test_wrong_type_is_named():
    with pytest.raises(MolmatError, match=r"'preprocess\.shard_size'"):
        load_config(None, ["preprocess.shard_size=lots"])


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["preprocess.crystal.cutoff=6.5", "preprocess.targets=[a, b]", "split.method=scaffold"])
    assert cfg.preprocess.crystal.cutoff == 6.5
    assert cfg.preprocess.targets == ["a", "b"]
    assert cfg.split.method == "scaffold"
    with pytest.raises(MolmatError, match="KEY=VALUE"):
        load_config(None, ["preprocess.crystal.cutoff"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["preprocess.molecule.conformers=3"])
    path = write_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["preprocess"]["molecule"]["conformers"] == 3


def test_config_yaml_documents_every_key_at_its_default():
    """config.yaml is the reference users read: every section and key, each at the schema default."""
    from pathlib import Path

    from pipeline.config import Config

    shipped = load_config().model_dump(mode="json")
    defaults = Config().model_dump(mode="json")
    for section, values in defaults.items():
        if section == "run":
            continue
        assert shipped[section] == values, f"config.yaml section '{section}' differs from the schema defaults"
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict) and k not in ("units", "loss_weights"):
                yield from keys(v, prefix + k + ".")

    missing = set(keys({k: v for k, v in defaults.items() if k != "run"})) - set(keys(raw))
    assert not missing, f"config.yaml does not show {sorted(missing)}"
