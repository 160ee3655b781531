"""Model directories: build -> save -> load for every slot combination, molmat 0.1 directories, damaged files."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATASETS, qm9_files
from pipeline import MolmatError
from pipeline.checkpoint import (ENCODER, PROPERTY_MODEL, WEIGHTS, load_model_dir, read_model_config, save_model_dir,
                                 unwrap)
from pipeline.config import ModelConfig
from pipeline.graphs import collate
from pipeline.models.contrastive import ContrastiveModel
from pipeline.models.property import PropertyModel, target_specs
from pipeline.shards import ShardDataset

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v0_1"
TINY_2D = {"name": "mpnn", "hidden": 8, "steps": 1, "set2set_iters": 1}
TINY_3D = {"name": "schnet", "hidden": 8, "interactions": 1, "n_rbf": 8}
SLOTS = {"2d only": (TINY_2D, None), "3d only": (None, TINY_3D), "both": (TINY_2D, TINY_3D)}


def _records(shards: Path, n: int, wanted: list[str]) -> tuple[list[dict], list]:
    ds = ShardDataset(shards)
    cols = [ds.targets.index(w) for w in wanted]
    return [dict(ds[i], y=ds[i]["y"][cols]) for i in range(n)], ds.manifest["targets"]


@pytest.mark.parametrize("slots", list(SLOTS))
def test_build_save_load_gives_identical_predictions(slots, mp_shards, tmp_path):
    enc2d, enc3d = SLOTS[slots]
    wanted = ["band_gap_eV", "K_VRH_GPa"]
    recs, targets = _records(mp_shards, 48, wanted)
    cfg = ModelConfig.model_validate({"encoder2d": enc2d, "encoder3d": enc3d, "heads": {"hidden": 8}})
    model = PropertyModel(cfg, target_specs(targets, wanted, None, None, {}))
    model.fit_normalization([collate(recs[:24]), collate(recs[24:])])  # buffers away from their defaults
    assert model.std[0] != 1.0
    before = model.eval().predict(collate(recs)).numpy()
    meta = {"model": cfg.model_dump(mode="json"), "targets": model.describe(), "featurization": {}, "preprocess": {}}
    save_model_dir(tmp_path / "m", model, PROPERTY_MODEL, meta)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", WEIGHTS]  # no temporary files left
    loaded = load_model_dir(tmp_path / "m")
    assert isinstance(loaded, PropertyModel) and loaded.views() == [v for v, e in (("2d", enc2d), ("3d", enc3d)) if e]
    after = loaded.predict(collate(recs)).numpy()
    np.testing.assert_array_equal(after, before)


def test_encoder_directory_round_trip(qm9_shards, tmp_path):
    model = ContrastiveModel(TINY_2D, TINY_3D, 8, 4)
    recs, _ = _records(qm9_shards, 8, [])
    batch = collate(recs)
    z2, z3 = model(batch, batch)
    meta = {"model": {"encoder2d": TINY_2D, "encoder3d": TINY_3D}, "pretrain": {"proj_hidden": 8, "proj_dim": 4}}
    save_model_dir(tmp_path / "enc", model, ENCODER, meta)
    again = load_model_dir(tmp_path / "enc", [ENCODER])
    a2, a3 = again(batch, batch)
    torch.testing.assert_close(a2, z2, rtol=0, atol=0)
    torch.testing.assert_close(a3, z3, rtol=0, atol=0)
    with pytest.raises(MolmatError, match="holds a pretrained encoder, but a property model is needed"):
        load_model_dir(tmp_path / "enc", [PROPERTY_MODEL])


def _csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("run,inputs,targets", [
    ("run_qm9_mpnn", "qm9", ["gap_Ha", "U0_Ha"]),
    ("run_qm9_both", "qm9", ["homo_Ha"]),
    ("run_mp_schnet", "mp", ["band_gap_eV", "K_VRH_GPa"]),
])
def test_molmat_0_1_model_directories_predict_the_same_numbers(run, inputs, targets, tmp_path, caplog):
    """Directories written by the code before encoder slots (old config layout, .pt weights) still work."""
    from finetune.predict import predict

    expected = _csv_rows(LEGACY / f"pred_{run.split('_', 1)[1]}.csv")
    sources = [str(f) for f in qm9_files(20)] if inputs == "qm9" else [str(DATASETS / "mp" / "cifs.tar.gz")]
    out = tmp_path / "p.csv"
    with caplog.at_level("WARNING"):
        predict(LEGACY / run, sources, out)
    assert "load only files you trust" in caplog.text
    got = {r["id"]: r for r in _csv_rows(out)}
    assert len(expected) == 20
    for row in expected:
        for t in targets:
            assert float(got[row["id"]][t]) == pytest.approx(float(row[t]), rel=1e-6, abs=1e-9), (row["id"], t)
    _, config = read_model_config(LEGACY / run)
    assert config["model"]["encoder2d"] is None if run == "run_mp_schnet" else config["model"]["encoder2d"]["hidden"] == 8


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_molmat_0_1_encoder_directory_embeds_the_same(which, tmp_path):
    from pretrain.embed import embed

    expected = _csv_rows(LEGACY / f"emb_qm9_{which}.csv")
    out = tmp_path / "e.csv"
    embed(LEGACY / "enc_qm9", [str(f) for f in qm9_files(20)], out, which=which)
    got = _csv_rows(out)
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for a, b in zip(got, expected):
        keys = [k for k in b if k[0] == "e" and k[1:].isdigit()]
        assert len(keys) > 4 and a["error"] == b["error"] == ""
        np.testing.assert_allclose([float(a[k]) for k in keys], [float(b[k]) for k in keys], rtol=1e-5, atol=1e-6)


def test_resaving_a_legacy_directory_writes_safetensors_only(tmp_path):
    model = load_model_dir(LEGACY / "run_qm9_mpnn")
    shutil.copytree(LEGACY / "run_qm9_mpnn", tmp_path / "m")
    save_model_dir(tmp_path / "m", model, PROPERTY_MODEL, {k: v for k, v in model.meta.items()
                                                           if k not in ("format", "layout", "format_version", "code_version")})
    assert not (tmp_path / "m" / "model.pt").exists()
    again = load_model_dir(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert json.loads((tmp_path / "m" / "config.json").read_text())["layout"] == 2


def test_damaged_weights_and_configs_are_refused_with_the_file_named(tmp_path):
    model = load_model_dir(LEGACY / "run_qm9_both")
    d = tmp_path / "m"
    save_model_dir(d, model, PROPERTY_MODEL, {k: v for k, v in model.meta.items()
                                              if k not in ("format", "layout", "format_version", "code_version")})
    weights = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(weights[: len(weights) // 2])  # truncated copy of a real file
    with pytest.raises(MolmatError, match=f"{WEIGHTS}: not a readable safetensors file"):
        load_model_dir(d)
    (d / WEIGHTS).write_bytes(weights)
    conf = (d / "config.json").read_text()
    (d / "config.json").write_text(conf[:-20])
    with pytest.raises(MolmatError, match="config.json: unreadable"):
        load_model_dir(d)
    conf = json.loads(conf)
    conf["model"]["heads"]["hidden"] = 9
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MolmatError, match="weights do not fit the architecture"):
        load_model_dir(d)
    with pytest.raises(MolmatError, match="not a molmat model directory"):
        load_model_dir(tmp_path)


def test_unwrap_returns_the_plain_module():
    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net
    assert unwrap(torch.nn.DataParallel(net)) is net
