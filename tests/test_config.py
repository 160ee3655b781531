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


def test_molmat_0_1_model_layout_is_translated_with_a_deprecation_line(tmp_path, caplog):
    """Old config files and old --set overrides (job scripts carry them) still mean what they meant."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  encoder: both\n  mpnn: {hidden: 32, steps: 2}\n  schnet: {cutoff: 4.0}\n"
                   "finetune:\n  head_hidden: 16\n  dropout: 0.1\n")
    with caplog.at_level("WARNING", logger="molmat.config"):
        cfg = load_config(old)
    assert "deprecated config keys" in caplog.text and "model.encoder=both" in caplog.text
    assert (cfg.model.encoder2d.name, cfg.model.encoder2d.hidden, cfg.model.encoder2d.steps) == ("mpnn", 32, 2)
    assert (cfg.model.encoder3d.name, cfg.model.encoder3d.cutoff) == ("schnet", 4.0)
    assert (cfg.model.heads.hidden, cfg.model.heads.dropout) == (16, 0.1)
    assert cfg.pretrain.encoder3d.cutoff == 4.0  # model.schnet also configured pretraining's 3D encoder

    cfg = load_config(None, ["model.encoder=schnet", "model.schnet.hidden=16"])
    assert cfg.model.encoder2d is None and cfg.model.encoder3d.hidden == 16
    cfg = load_config(None, ["model.mpnn.hidden=16", "model.schnet.cutoff=8.0"])
    # the 3D slot stays empty, as model.encoder: mpnn (the default) left it; pretraining takes the cutoff
    assert cfg.model.encoder2d.hidden == 16 and cfg.model.encoder3d is None and cfg.pretrain.encoder3d.cutoff == 8.0
    with pytest.raises(MolmatError, match="must be mpnn, schnet or both"):
        load_config(None, ["model.encoder=gcn"])


def test_encoder_slots_are_checked_by_view_and_default_names():
    cfg = load_config(None, ["model.encoder3d.cutoff=4.5"])  # an auto slot filled without a name: schnet
    assert cfg.model.encoder3d.name == "schnet" and cfg.model.encoder2d == "auto"
    assert cfg.model.resolve(["molecule"]).encoder2d.name == "mpnn"  # auto: molecules keep the MPNN
    assert cfg.model.resolve(["crystal"]).encoder2d is None
    with pytest.raises(MolmatError, match="model.encoder2d needs an encoder of the 2d graph; 'schnet'"):
        load_config(None, ["model.encoder2d.name=schnet"])  # switching the name drops the MPNN's settings
    with pytest.raises(MolmatError, match="unknown key 'model.encoder2d.mpnn.cutof'"):
        load_config(None, ["model.encoder2d.cutof=3"])
    with pytest.raises(MolmatError, match="both null"):
        load_config(None, ["model.encoder2d=null"]).model.resolve(["molecule"])
    with pytest.raises(MolmatError, match="both null"):
        load_config(None, ["model.encoder2d=null", "model.encoder3d=null"])


def test_auto_slots_take_the_per_kind_defaults():
    """Unset slots follow the data: crystals get the crystal default, molecules and mixed data the
    molecule default; a slot the run sets is kept; pretraining's 2D encoder never resolves to null."""
    cfg = load_config()
    assert (cfg.model.encoder2d, cfg.model.encoder3d) == ("auto", "auto")
    mol, cry, mixed = (cfg.model.resolve(k) for k in (["molecule"], ["crystal"], ["crystal", "molecule"]))
    assert (mol.encoder2d.name, mol.encoder3d) == ("mpnn", None) and mixed == mol
    assert cry.encoder2d is None and cry.encoder3d == cfg.model.auto.crystal.encoder3d
    assert (cry.encoder3d.name, cry.encoder3d.cutoff, cry.encoder3d.block_norm) == ("painn", 8.0, True)
    assert (cry.encoder3d.element_descriptors, cry.encoder3d.readout) == (True, "softmax")
    assert cry.is_resolved() and cry.resolve(["molecule"]) is cry  # resolving twice changes nothing
    set3d = load_config(None, ["model.encoder3d={name: painn, cutoff: 6.0}"]).model.resolve(["crystal"])
    assert set3d.encoder2d is None and (set3d.encoder3d.name, set3d.encoder3d.cutoff) == ("painn", 6.0)
    assert not set3d.encoder3d.block_norm  # a slot that names an encoder starts from its defaults
    assert not set3d.encoder3d.element_descriptors and set3d.encoder3d.readout == "mean"
    with pytest.raises(MolmatError, match="model.auto.crystal.encoder3d needs an encoder of the 3d graph"):
        load_config(None, ["model.auto.crystal.encoder3d={name: mpnn}"])
    with pytest.raises(MolmatError, match="must be resolved"):
        cfg.model.slots()
    with pytest.raises(MolmatError, match="encoder2d"):
        load_config(None, ["model.encoder2d.name=gin"])
    assert load_config(None, ["model.encoder2d=null", "model.encoder3d.name=schnet"]).model.slots().keys() == {"encoder3d"}
