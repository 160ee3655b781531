"""``molmat curvature`` end to end, curvature-weighted fine-tuning, and the learning-rate scaling rule.

On the shipped QM9 sample: a tiny property model is fine-tuned here, then analysed by the CLI.
The CLI's top eigenvalue of the total loss over the head parameters is checked against the dense
Hessian of an independently written loss (the heads applied to the fixed encoder embedding,
per-target MSE and weighted mean written out here), built by ``torch.autograd.functional.hessian``.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.distributed import scaled_lr

SMALL = ["model.encoder2d.hidden=16", "model.encoder2d.steps=2", "model.heads.hidden=8", "train.batch_size=32",
         "train.warmup_steps=2", "train.log_every=1000", "train.threads=1", "finetune.targets=[gap_Ha, U0_Ha]"]
#: Small but converged settings: 30 val records in 2 batches; heads of 2 x 281 parameters.
CURV = ["curvature.batches=2", "curvature.batch_size=16", "curvature.lanczos_iters=40", "curvature.top_k=5",
        "curvature.trace_probes=8", "curvature.slq_starts=2", "curvature.slq_iters=12", "curvature.float64=true"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(*extra: str):
    return load_config(None, SMALL + list(extra))


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


@pytest.fixture(scope="module")
def trained(qm9_shards, tmp_path_factory):
    from finetune.train import finetune

    out = tmp_path_factory.mktemp("curv") / "run"
    finetune(qm9_shards, out, _cfg("train.epochs=1"))
    return out


@pytest.fixture(scope="module")
def cli_result(trained, qm9_shards):
    out = trained / "curv_heads"
    rc = main(["curvature", str(trained), "--data", str(qm9_shards), "--params", "heads", "--out", str(out)]
              + _sets(CURV))
    assert rc == 0
    return out, json.loads((out / "curvature.json").read_text())


def test_cli_writes_every_task_with_its_fields_and_pictures(cli_result):
    out, res = cli_result
    assert res["complete"] and res["not_run"] == [] and res["split"] == "val" and res["params"] == "heads"
    assert list(res["tasks"]) == ["gap_Ha", "U0_Ha", "total"] and res["records"] == 30
    assert res["n_params"] == 2 * (32 * 8 + 8 + 8 + 1) and res["dtype"] == "float64"
    assert res["versions"]["torch"] == torch.__version__ and res["settings"]["lanczos_iters"] == 40
    for task, e in res["tasks"].items():
        k = len(e["eigenvalues"])
        assert k == 5 and e["eigenvalues"] == sorted(e["eigenvalues"], reverse=True)
        assert len(e["residuals"]) == k and max(e["residuals"][:1]) < 1e-6 * abs(e["eigenvalues"][0])
        assert e["method"] == "autograd" and e["hvp_check"]["rel_error"] < 1e-4  # float64: double backprop is right
        assert e["trace_se"] > 0 and e["seconds"] > 0 and 0 <= e["negative_mass_significant"] <= e["negative_mass"] <= 1
        nodes, weights = np.array(e["density"]["nodes"]), np.array(e["density"]["weights"])
        # start 1 is the top-eigenvalue Lanczos run (40 steps), start 2 has slq_iters (12), padded
        assert nodes.shape == weights.shape == (2, 40) and (weights[1, 12:] == 0).all()
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-10)
        assert 0 <= e["r_top"] <= 1 and e["hvp_vs_grad"] > 0
    assert res["r_reference"]["goe"] == pytest.approx(0.5307)
    assert res["cost"]["ratio_autograd"] > 0 and res["cost"]["grad_s"] > 0
    for name in ["curvature_gap_Ha.png", "curvature_U0_Ha.png", "curvature_total.png", "curvature_comparison.png"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    assert (out / "config.resolved.yaml").exists()


def _to_float64(batch):
    """The batch's float tensors as float64 (written here, independent of finetune.curvature)."""
    for g in (batch.g2d, batch.g3d):
        if g is not None:
            for data in (g.ndata, g.edata):
                for key in list(data.keys()):
                    if data[key].is_floating_point():
                        data[key] = data[key].double()
    batch.cell, batch.y = batch.cell.double(), batch.y.double()
    return batch


def test_top_eigenvalue_and_trace_match_a_dense_hessian_of_the_heads(cli_result, trained, qm9_shards):
    """The heads see a fixed embedding, so the total loss as a function of the flat head parameters
    is a small MLP written out here; its dense Hessian gives the exact spectrum and trace."""
    from finetune import load_model
    from pipeline.graphs import collate
    from pipeline.shards import ShardDataset, load_manifest
    from pipeline.splits import load_split

    _, res = cli_result
    model = load_model(trained).double().eval()
    names = [t["name"] for t in load_manifest(qm9_shards)["targets"]]
    cols = [names.index(s.name) for s in model.targets]
    ds = ShardDataset(qm9_shards, load_split(qm9_shards)["val"])
    recs = [dict(r, y=r["y"][cols]) for r in (ds[i] for i in range(len(ds)))]
    batch = _to_float64(collate(recs))
    with torch.no_grad():
        h = model.embed(batch)
        target, mask = model.normalize(batch.y, batch.mask, batch)
    target = target.double()
    assert bool(mask.all())  # QM9: every target labelled, so the batch split does not change the total
    shapes = [p.shape for p in model.heads.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.heads.parameters()])
    weight = model.loss_weight.double()

    def total(flat: torch.Tensor) -> torch.Tensor:
        parts = list(flat.split([int(np.prod(s)) for s in shapes]))
        preds = []
        for j in range(len(model.targets)):  # Linear -> SiLU -> Linear per head
            w1, b1, w2, b2 = (parts[4 * j + i].view(shapes[4 * j + i]) for i in range(4))
            preds.append(torch.nn.functional.silu(h @ w1.T + b1) @ w2.T + b2)
        pred = torch.cat(preds, dim=1)
        per_target = ((pred - target) ** 2 * mask).sum(0) / mask.sum(0)
        return (weight * per_target).sum() / weight.sum()

    hess = torch.autograd.functional.hessian(total, flat0)
    assert hess.shape == (res["n_params"], res["n_params"])
    lam = torch.linalg.eigvalsh(0.5 * (hess + hess.T))
    e = res["tasks"]["total"]
    assert e["loss"] == pytest.approx(float(total(flat0)), rel=1e-10)
    assert e["eigenvalues"][0] == pytest.approx(float(lam[-1]), rel=1e-4)
    assert e["eigenvalues"][:3] == pytest.approx(lam.flip(0)[:3].tolist(), rel=1e-4)
    exact_trace = float(lam.sum())
    assert abs(e["trace"] - exact_trace) < 4 * e["trace_se"]


def test_time_limit_marks_the_output_incomplete(trained, qm9_shards, tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["curvature", str(trained), "--data", str(qm9_shards), "--params", "heads", "--tasks", "U0_Ha,gap_Ha",
               "--out", str(out)] + _sets(["curvature.batches=1", "curvature.batch_size=8", "curvature.lanczos_iters=4",
                                          "curvature.top_k=3", "curvature.trace_probes=2", "curvature.slq_starts=1",
                                          "curvature.slq_iters=4", "curvature.max_minutes=1e-6",
                                          "curvature.hvp=fd", "curvature.float64=true"]))
    assert rc == 0
    res = json.loads((out / "curvature.json").read_text())
    assert res["tasks"]["gap_Ha"]["method"] == "fd"  # as told, with the check still recorded
    assert res["tasks"]["gap_Ha"]["hvp_check"]["rel_error"] < 1e-4
    # tasks run in the model's target order; the budget is spent after the first
    assert not res["complete"] and list(res["tasks"]) == ["gap_Ha"] and res["not_run"] == ["U0_Ha"]
    assert "incomplete" in capsys.readouterr().err
    assert (out / "curvature_gap_Ha.png").exists() and (out / "curvature_comparison.png").exists()


def test_gated_crystal_targets_encoder_group_in_float32(mp_shards, tmp_path):
    """SchNet on MP crystals with a gated band gap (its gate is part of the loss) and a composition
    baseline; the encoder group only; float32 analysis, where auto still picks double backprop."""
    from finetune.curvature import curvature
    from finetune.train import finetune
    from finetune import load_model
    from pipeline.config import CurvatureConfig

    run = tmp_path / "mp"
    finetune(mp_shards, run, load_config(None, ["train.batch_size=32", "train.warmup_steps=2", "train.threads=1",
        "finetune.targets=[band_gap_eV, formation_energy_per_atom_eV]", "train.epochs=1", "finetune.max_train=64",
        "model.encoder2d=null", "model.encoder3d={name: schnet, hidden: 8, interactions: 1, n_rbf: 8, cutoff: 8.0}",
        "model.heads.hidden=8"]))
    cfg = CurvatureConfig(batches=1, batch_size=16, top_k=3, lanczos_iters=6, trace_probes=2, slq_starts=1,
                          slq_iters=5, float64=False)
    res = curvature(run, mp_shards, "val", params="encoder", out=tmp_path / "c", config=cfg, device="cpu")
    model = load_model(run)
    assert len(model.gates) == 1
    assert res["n_params"] == sum(p.numel() for p in model.encoder3d.parameters()) and res["dtype"] == "float32"
    assert list(res["tasks"]) == ["band_gap_eV", "formation_energy_per_atom_eV", "total"]
    for e in res["tasks"].values():
        # the check runs on a float64 copy (float32 differences cannot resolve 1e-4)
        assert e["method"] == "autograd" and e["hvp_check"]["tolerance"] == 1e-4
        assert e["hvp_check"]["rel_error"] < 1e-4 and math.isfinite(e["eigenvalues"][0])


def test_unknown_task_is_a_clear_error(trained, qm9_shards, tmp_path, capsys):
    rc = main(["curvature", str(trained), "--data", str(qm9_shards), "--tasks", "gap_Ha,band_gap_eV",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task(s) band_gap_eV" in err and "gap_Ha, U0_Ha" in err and "total" in err
    assert "\n" not in err.strip()  # one line, no traceback


def _losses(run) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock column."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_curvature_weighting_changes_weights_and_disabled_is_bit_identical(qm9_shards, tmp_path):
    from finetune.train import finetune

    base = ["train.epochs=2", "finetune.max_train=96"]
    finetune(qm9_shards, tmp_path / "plain", _cfg(*base))
    finetune(qm9_shards, tmp_path / "off", _cfg(*base, "finetune.curvature_weighting.enabled=false",
                                                 "finetune.curvature_weighting.every=1",
                                                 "finetune.curvature_weighting.power=2"))
    finetune(qm9_shards, tmp_path / "on", _cfg(*base, "finetune.curvature_weighting.enabled=true",
                                                "finetune.curvature_weighting.every=1",
                                                "finetune.curvature_weighting.batch_size=32",
                                                "finetune.curvature_weighting.power=2"))
    plain, off, on = _losses(tmp_path / "plain"), _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert plain == off and not (tmp_path / "off" / "loss_weights.csv").exists()
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "off" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # measuring draws no random numbers and the weights act from the next epoch on
    assert on[0] == plain[0] and on[1]["train_loss"] != plain[1]["train_loss"]
    rows = list(csv.DictReader(open(tmp_path / "on" / "loss_weights.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert set(rows[0]) == {"epoch", "step", "statistic", "top_gap_Ha", "top_U0_Ha", "weight_gap_Ha", "weight_U0_Ha"}
    w = np.array([[float(r["weight_gap_Ha"]), float(r["weight_U0_Ha"])] for r in rows])
    assert np.abs(w - 1).max() > 1e-3 and np.allclose(w.mean(1), 1.0, atol=1e-6)
    # the sharper task gets the smaller weight, and the weights are saved for a resumed run
    top = [float(rows[-1]["top_gap_Ha"]), float(rows[-1]["top_U0_Ha"])]
    assert (w[-1, 0] < w[-1, 1]) == (top[0] > top[1])
    saved = torch.load(tmp_path / "on" / "last.pt", weights_only=True)["model"]["loss_weight"]
    np.testing.assert_allclose(saved.numpy(), w[-1], rtol=1e-6)
    assert torch.equal(a["loss_weight"], torch.ones(2))


def test_scaled_lr_rules_with_and_without_a_reference_batch(qm9_shards, tmp_path):
    # no reference: only the process count matters (the behaviour before reference batches)
    assert scaled_lr(1e-3, 4, "linear") == scaled_lr(1e-3, 4, "linear", 64, None) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 4, "sqrt", 64, None) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 4, "none", 64, None) == 1e-3
    # with one: effective batch (batch x processes) over the reference
    assert scaled_lr(1e-3, 1, "linear", 128, 32) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 1, "sqrt", 128, 32) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 2, "sqrt", 64, 32) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 1, "sqrt", 16, 64) == pytest.approx(5e-4)
    assert scaled_lr(1e-3, 2, "none", 64, 32) == 1e-3
    # and the trainer uses it: a constant schedule shows the scaled rate in metrics.csv
    from finetune.train import finetune

    finetune(qm9_shards, tmp_path / "r", _cfg("train.epochs=1", "finetune.max_train=32", "train.schedule=constant",
                                              "train.warmup_steps=0", "train.lr_scaling=sqrt",
                                              "train.reference_batch_size=8"))
    row = next(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert float(row["lr"]) == pytest.approx(1e-3 * math.sqrt(32 / 8))
