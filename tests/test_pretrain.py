"""3D Infomax: the loss, multi-conformer positives, pretraining, save/load/embed, fine-tuning from it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import DATASETS, qm9_files
from safetensors.torch import load_file
from pipeline.config import load_config
from pipeline.preprocess import preprocess
from pipeline.shards import ShardDataset
from pretrain import load_encoder
from pretrain.infomax import contrastive_metrics, make_collate, nt_xent
from pretrain.train import pretrain
from finetune.train import finetune

SMALL = ["model.encoder2d.hidden=16", "model.encoder2d.steps=2", "pretrain.encoder3d.hidden=16",
         "pretrain.encoder3d.interactions=2",
         "pretrain.encoder3d.n_rbf=16", "pretrain.proj_hidden=32", "pretrain.proj_dim=16", "train.batch_size=32",
         "train.warmup_steps=0", "train.log_every=1000", "model.heads.hidden=16"]


@pytest.fixture(scope="module")
def conformer_shards(tmp_path_factory):
    """60 real QM9 molecules with 2 extra ETKDG conformers each."""
    src = tmp_path_factory.mktemp("src")
    for f in qm9_files(60):
        (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path_factory.mktemp("conf") / "shards"
    preprocess([str(src)], out, load_config(None, ["preprocess.molecule.conformers=2"]), workers=0)
    return out


def test_loss_is_lowest_when_views_agree():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    owner = torch.arange(16)
    agree = nt_xent(z, z, owner, 0.1)
    shuffled = nt_xent(z, z[torch.randperm(16)], owner, 0.1)
    noisy = nt_xent(z, torch.nn.functional.normalize(z + 0.5 * torch.randn(16, 8), dim=-1), owner, 0.1)
    assert agree < noisy < shuffled
    m = contrastive_metrics(z, z, owner)
    assert m["accuracy"] == 1.0 and m["alignment"] == pytest.approx(0.0, abs=1e-6)


def test_several_positives_are_counted():
    """Two structures, three views each: the 2D->3D term averages the log-probabilities of all own views."""
    torch.manual_seed(1)
    z2 = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    z3 = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    logits = z2 @ z3.T / 0.5
    lp = logits.log_softmax(1)
    expect_2d = -(lp[0, :3].mean() + lp[1, 3:].mean()) / 2
    lq = logits.log_softmax(0)
    expect_3d = -torch.stack([lq[owner[j], j] for j in range(6)]).mean()
    torch.testing.assert_close(nt_xent(z2, z3, owner, 0.5), (expect_2d + expect_3d) / 2)


def test_conformer_views_and_owner(conformer_shards):
    ds = ShardDataset(conformer_shards)
    recs = [ds[i] for i in range(5)]
    assert all(r["conformers"].shape[0] == 2 for r in recs)
    batch = make_collate(5.0, True)(recs)
    assert batch.owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert batch.views.num_graphs == 15 and batch.graphs.num_graphs == 5
    # each conformer view has the molecule's atoms and its own geometry
    n = recs[1]["z"].size
    pos = batch.views.g3d.ndata["pos"]
    start = int(batch.views.n_atoms[:4].sum())
    np.testing.assert_allclose(pos[start:start + n].numpy(), recs[1]["conformers"][0], atol=1e-6)
    assert make_collate(5.0, False)(recs).owner.tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def encoder_dir(conformer_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "enc"
    pretrain([conformer_shards], out, load_config(None, SMALL + ["train.epochs=1", "train.lr=3e-3"]))
    return out


@pytest.mark.slow
def test_loss_falls_within_a_few_steps(conformer_shards, tmp_path):
    # 32 steps: the loss sits on a plateau for the first ~10 steps from some initialisations
    pretrain([conformer_shards], tmp_path / "e", load_config(None, SMALL + ["train.epochs=16", "train.lr=3e-3",
                                                                              "train.schedule=constant"]))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "e" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert min(losses[-3:]) < losses[0] - 0.3, losses
    assert {"val_accuracy", "val_alignment", "val_uniformity"} <= set(rows[0])


def test_save_load_embed_round_trip(encoder_dir, conformer_shards, tmp_path):
    from pipeline.graphs import collate

    enc = load_encoder(encoder_dir)
    ds = ShardDataset(conformer_shards)
    direct = enc(collate([ds[i] for i in range(3)]))[0].detach().numpy()
    out = tmp_path / "emb.npz"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed", str(encoder_dir)] +
                       [str(f) for f in qm9_files(3)] + ["--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = np.load(out, allow_pickle=False)
    assert data["ids"].tolist() == [ds[i]["_id"] for i in range(3)]
    np.testing.assert_allclose(data["embeddings"], direct, rtol=1e-5, atol=1e-6)
    enc3d = load_encoder(encoder_dir, which="3d")
    assert enc3d(collate([ds[0]]))[0].shape == (1, 16)


def _encoder_params(state, prefix="encoder2d."):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("freeze", [True, False])
def test_finetune_from_encoder_respects_freeze(encoder_dir, conformer_shards, tmp_path, freeze):
    run = tmp_path / "ft"
    cfg = load_config(None, SMALL + ["train.epochs=1", "finetune.targets=[gap_Ha]", f"finetune.freeze_encoder={freeze}",
                                     "model.encoder2d.hidden=64"])  # the encoder's architecture wins over this
    finetune(conformer_shards, run, cfg, init=str(encoder_dir))
    pre = load_file(str(encoder_dir / "model.safetensors"))
    post = torch.load(run / "last.pt", weights_only=True)["model"]
    changed = [k for k, v in _encoder_params(pre).items() if not torch.equal(v, post[k])]
    if freeze:
        assert changed == []
    else:
        assert len(changed) > 5
    heads = [k for k in post if k.startswith("heads.")]
    assert heads and post[heads[0]].abs().sum() > 0


def test_pretraining_on_molecules_and_crystals_together(qm9_shards, mp_shards, tmp_path):
    """One run over a molecule and a crystal shard directory; the encoder then embeds both kinds."""
    import json

    from pipeline.graphs import collate

    pretrain([qm9_shards, mp_shards], tmp_path / "enc", load_config(None, SMALL + ["train.epochs=1"]))
    meta = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert meta["kinds"] == ["crystal", "molecule"]
    from pipeline.splits import load_split

    # throughput counts structures of both kinds: one epoch over both train splits
    trained = sum(len(load_split(d)["train"]) for d in (qm9_shards, mp_shards))
    assert json.loads((tmp_path / "enc" / "timing.json").read_text())["graphs"] == trained
    enc = load_encoder(tmp_path / "enc")
    mol, cryst = ShardDataset(qm9_shards)[0], ShardDataset(mp_shards)[0]
    assert (mol["_kind"], cryst["_kind"]) == ("molecule", "crystal")
    emb, _ = enc(collate([dict(r, y=np.zeros(0)) for r in (mol, cryst)]))  # labels differ; embedding needs none
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()

    # fine-tuning crystals from it with the model slots on auto: the crystal default's 3D slot
    # (here PaiNN) gives way to the pretrained 3D encoder (SchNet), whose weights are loaded
    run = tmp_path / "ft_mp"
    cfg = load_config(None, SMALL + ["train.epochs=1", "finetune.targets=[band_gap_eV]",
                                     "model.auto.crystal.encoder3d={name: painn, cutoff: 5.0}"])
    finetune(mp_shards, run, cfg, init=str(tmp_path / "enc"))
    model = json.loads((run / "best" / "config.json").read_text())["model"]
    # (SMALL sets model.encoder2d, so that slot is not auto: it holds the pretrained MPNN)
    assert model["encoder2d"] == meta["model"]["encoder2d"] and model["encoder3d"] == meta["model"]["encoder3d"]
