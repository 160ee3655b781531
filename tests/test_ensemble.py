"""Ensembles of property models (molmat ensemble) and fine-tuning from another property model's encoder."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, mp_cif_texts
from pipeline import MolmatError
from pipeline.checkpoint import load_model_dir, load_pretrained_encoders, pretrained_model_config
from pipeline.config import load_config
from pipeline.graphs import collate
from pipeline.models.property import PropertyModel
from pipeline.shards import ShardDataset, load_manifest
from finetune import load_model
from finetune.ensemble import make_ensemble
from finetune.evaluate import evaluate
from finetune.modeldata import open_model_on_split
from finetune.predict import predict
from finetune.train import finetune

TARGETS = "finetune.targets=[band_gap_eV, formation_energy_per_atom_eV, G_VRH_GPa]"
SMALL = ["model.encoder2d=null", "model.encoder3d={name: schnet, hidden: 16, interactions: 2, n_rbf: 16, cutoff: 8.0}",
         "model.heads.hidden=16", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1000",
         "train.epochs=3"]


@pytest.fixture(scope="module")
def members(mp_shards, tmp_path_factory):
    """Two crystal models of the same targets and split, trained with other seeds."""
    root = tmp_path_factory.mktemp("members")
    runs = []
    for seed in (0, 1):
        run = root / f"s{seed}"
        finetune(mp_shards, run, load_config(None, SMALL + [TARGETS, f"train.seed={seed}"]))
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def ensemble_dir(members, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    make_ensemble(members, out)
    return out


def _batch(run, mp_shards, n=128):
    """The first n records of the shards with the model's target columns."""
    return next(iter(open_model_on_split(run, mp_shards, "all").loader(n)))


def test_ensemble_averages_its_members(members, ensemble_dir, mp_shards):
    a, b = load_model(members[0]), load_model(members[1])
    ens = load_model(ensemble_dir)
    batch = _batch(members[0], mp_shards)
    pa, pb, pe = a.predict(batch).numpy(), b.predict(batch).numpy(), ens.predict(batch).numpy()
    assert not np.allclose(pa, pb)  # other seeds, other models: the test below means something
    # formation energy (linear transforms of one normalisation): the arithmetic mean
    np.testing.assert_allclose(pe[:, 1], (pa[:, 1] + pb[:, 1]) / 2, rtol=1e-6, atol=1e-9)
    # shear modulus, learned as log10: the geometric mean of the members' moduli
    np.testing.assert_allclose(pe[:, 2], np.sqrt(pa[:, 2] * pb[:, 2]), rtol=1e-6)
    # band gap: zero where both members say metal, the mean where both say non-metal (and predict > 0)
    both_zero = (pa[:, 0] == 0) & (pb[:, 0] == 0)
    both_pos = (pa[:, 0] > 0) & (pb[:, 0] > 0)
    assert both_zero.any() or both_pos.any()
    assert (pe[both_zero, 0] == 0).all()
    np.testing.assert_allclose(pe[both_pos, 0], (pa[both_pos, 0] + pb[both_pos, 0]) / 2, rtol=1e-6)
    assert (pe[:, 0] >= 0).all()


def test_ensemble_directory_round_trip_evaluate_and_predict(members, ensemble_dir, mp_shards, tmp_path):
    conf = json.loads((ensemble_dir / "config.json").read_text())
    assert conf["format"] == "molmat-property-ensemble" and len(conf["members"]) == 2
    assert [t["name"] for t in conf["targets"]] == ["band_gap_eV", "formation_energy_per_atom_eV", "G_VRH_GPa"]
    m = evaluate(ensemble_dir, mp_shards, "test", tmp_path / "ev")
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    pred = np.array([float(r["formation_energy_per_atom_eV_pred"]) for r in rows])
    true = np.array([float(r["formation_energy_per_atom_eV_true"]) for r in rows])
    assert m["targets"]["formation_energy_per_atom_eV"]["mae"] == pytest.approx(np.abs(pred - true).mean(), rel=1e-9)
    # predict on a raw CIF gives what the loaded ensemble gives on that crystal's record
    mp_id, text = next(iter(mp_cif_texts(1).items()))
    cif = tmp_path / f"{mp_id}.cif"
    cif.write_text(text)
    predict(ensemble_dir, [str(cif)], tmp_path / "p.csv")
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    ms = open_model_on_split(ensemble_dir, mp_shards, "all")
    rec = next(ms.dataset[i] for i in range(len(ms.dataset)) if ms.dataset[i]["_id"] == mp_id)
    expected = ms.model.predict(collate([rec]))[0].numpy()
    got = [float(row[k]) for k in row if k not in ("id", "source", "error", "warning")]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ensemble_cli_and_refusals(members, mp_shards, tmp_path):
    out = tmp_path / "cli_ens"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "ensemble", str(members[0]), str(members[1]),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ensemble of 2 models" in r.stdout and (out / "model.safetensors").is_file()
    with pytest.raises(MolmatError, match="at least two"):
        make_ensemble([members[0]], tmp_path / "one")
    # another training subset: other normalisation statistics, refused with the reason
    other = tmp_path / "subset"
    finetune(mp_shards, other, load_config(None, SMALL + [TARGETS, "train.epochs=1", "finetune.max_train=100"]))
    with pytest.raises(MolmatError, match="normalises its targets differently"):
        make_ensemble([members[0], other], tmp_path / "bad")
    # other targets
    fewer = tmp_path / "fewer"
    finetune(mp_shards, fewer, load_config(None, SMALL + ["finetune.targets=[band_gap_eV]", "train.epochs=1"]))
    with pytest.raises(MolmatError, match="other targets"):
        make_ensemble([members[0], fewer], tmp_path / "bad2")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_curvature_refuses_an_ensemble(ensemble_dir, mp_shards, tmp_path):
    from finetune.curvature import curvature
    from pipeline.config import CurvatureConfig

    with pytest.raises(MolmatError, match="property model ensemble"):
        curvature(ensemble_dir, mp_shards, "val", None, "heads", tmp_path / "c", CurvatureConfig())


def test_finetune_from_a_property_models_encoder(members, mp_shards, tmp_path):
    """Transfer learning: a model fine-tuned on band gap and formation energy starts a moduli model."""
    source = load_model(members[0])
    cfg = load_config(None, SMALL + ["finetune.targets=[K_VRH_GPa, G_VRH_GPa]", "model.encoder3d=auto"])
    model_cfg, slots = pretrained_model_config(cfg.model.resolve(["crystal"]), members[0], replace=["encoder3d"])
    assert slots == ["encoder3d"] and model_cfg.encoder3d.hidden == 16  # the source's architecture, not PaiNN's
    fresh = PropertyModel(model_cfg, source.targets[:1])
    load_pretrained_encoders(fresh, members[0], slots, load_manifest(mp_shards)["featurization"], ["crystal"])
    for k, v in source.encoder3d.state_dict().items():
        assert torch.equal(fresh.encoder3d.state_dict()[k], v)
    # end to end: the run records where its encoder came from and trains new heads
    run = tmp_path / "moduli"
    finetune(mp_shards, run, cfg, init=str(members[0]))
    conf = json.loads((run / "best" / "config.json").read_text())
    assert conf["init"] == str(members[0]) and conf["model"]["encoder3d"]["hidden"] == 16
    assert [t["name"] for t in conf["targets"]] == ["K_VRH_GPa", "G_VRH_GPa"]
    assert load_model_dir(run).heads[0][0].in_features == 16
