"""Property model, trainer and the finetune/evaluate/predict stages on tiny real samples."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from helpers import DATASETS, mp_cif_texts, qm9_files
from pipeline import MolmatError
from pipeline.config import load_config
from pipeline.graphs import collate
from pipeline.shards import ShardDataset
from finetune import load_model
from finetune.evaluate import evaluate
from finetune.losses import masked_loss, task_losses
from finetune.predict import predict
from finetune.train import finetune
from pipeline.config import ModelConfig
from pipeline.models.property import PropertyModel, target_specs

SMALL = ["model.encoder2d.hidden=16", "model.encoder2d.steps=2", "model.heads.hidden=16", "train.batch_size=32", "train.warmup_steps=2", "train.log_every=1000"]


def _cfg(*extra):
    return load_config(None, SMALL + list(extra))


def test_masked_loss_ignores_missing_labels():
    pred = torch.tensor([[1.0, 5.0], [2.0, 7.0]])
    target = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    loss = masked_loss(pred, target, mask, torch.ones(2))
    assert loss.item() == pytest.approx(2.0)  # (0 + 4) / 2 on target 0; target 1 has no labels
    mask[0, 1] = True
    assert masked_loss(pred, target, mask, torch.ones(2)).item() == pytest.approx((2.0 + 25.0) / 2)
    # one loss per target: what curvature analysis and loss weighting act on
    losses, count = task_losses(pred, target, mask)
    assert losses.tolist() == pytest.approx([2.0, 25.0]) and count.tolist() == [2, 1]
    assert masked_loss(pred, target, mask, torch.tensor([3.0, 1.0])).item() == pytest.approx((3 * 2.0 + 25.0) / 4)


def test_normaliser_round_trip_with_element_refs_and_log10(qm9_shards, mp_shards):
    for shards, wanted in ((qm9_shards, ["gap_Ha", "U0_Ha"]), (mp_shards, ["band_gap_eV", "K_VRH_GPa"])):
        ds = ShardDataset(shards)
        names = ds.targets
        specs = target_specs(ds.manifest["targets"], wanted, None, None, {})
        model = PropertyModel(ModelConfig.model_validate({"encoder2d": {"hidden": 8, "steps": 1},
                                                          "heads": {"hidden": 8}}), specs)
        cols = [names.index(w) for w in wanted]
        recs = [dict(ds[i], y=ds[i]["y"][cols]) for i in range(120)]
        batches = [collate(recs[i:i + 40]) for i in range(0, 120, 40)]
        model.fit_normalization(batches)
        b = batches[0]
        t, m = model.normalize(b.y, b.mask, b)
        back = model.to_physical(t.double(), b)
        np.testing.assert_allclose(back[m].numpy(), b.y.double()[m].numpy(), rtol=1e-5, atol=1e-6)
        if "U0_Ha" in wanted:
            assert model.element_ref[1, 6] < -30  # a carbon reference near -38 Ha
            all_t = torch.cat([model.normalize(x.y, x.mask, x)[0][:, 1] for x in batches])
            assert abs(all_t.mean()) < 1e-3 and abs(all_t.std() - 1) < 0.05
        if "K_VRH_GPa" in wanted:
            assert model.is_log10.tolist() == [False, True]
            assert m[:, 1].sum() < b.mask[:, 0].sum()  # moduli are missing for most crystals


def test_gated_band_gap_and_composition_baseline(mp_shards):
    """Band gaps: the regressor learns the positive gaps only, predictions are >= 0 and exactly 0
    where the gate says metal; formation energy: learned minus a least-squares fit on element
    fractions, which must explain part of its spread on real MP crystals."""
    ds = ShardDataset(mp_shards)
    wanted = ["band_gap_eV", "formation_energy_per_atom_eV"]
    specs = target_specs(ds.manifest["targets"], wanted, None, None, {})
    assert [(s.gated, s.composition_baseline) for s in specs] == [(True, False), (False, True)]
    model = PropertyModel(ModelConfig.model_validate({"encoder2d": {"hidden": 8, "steps": 1}, "heads": {"hidden": 8}}),
                          specs)
    assert len(model.gates) == 1
    cols = [ds.targets.index(w) for w in wanted]
    recs = [dict(ds[i], y=ds[i]["y"][cols]) for i in range(len(ds))]
    batches = [collate(recs[i:i + 100]) for i in range(0, len(recs), 100)]
    model.fit_normalization(batches)
    y = torch.cat([b.y for b in batches]).double()
    t, m = zip(*(model.normalize(b.y, b.mask, b) for b in batches))
    t, m = torch.cat(t), torch.cat(m)
    metals = y[:, 0] == 0
    assert metals.sum() > 20 and (~metals).sum() > 20  # both kinds in the sample
    assert not m[metals, 0].any() and m[~metals, 0].all()  # the regressor never sees a metal
    assert abs(t[m[:, 0], 0].mean()) < 1e-3  # normalised over the positive gaps
    # the composition fit explains part of the formation energy: residual spread below the raw one
    assert t[:, 1].std() * model.std[1] < 0.8 * y[:, 1].std()
    b = batches[0]
    tb, mb = model.normalize(b.y, b.mask, b)
    pred, logits = model.outputs(b)
    assert pred.shape == logits.shape == (b.num_graphs, 2) and (logits[:, 1] > 10).all()  # no gate on column 1
    # exact round trip where the gate is open on the true labels' side
    true_logits = torch.where(b.y > 0, 5.0, -5.0)
    back = model.to_physical(tb.double(), b, true_logits)
    np.testing.assert_allclose(back[:, 1].numpy(), b.y[:, 1].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back[:, 0].numpy(), b.y[:, 0].double().numpy(), rtol=1e-5, atol=1e-6)
    # whatever the network says: never negative, exactly zero with a closed gate
    with torch.no_grad():
        phys = model.predict(b)
    assert (phys[:, 0] >= 0).all()
    closed = model.to_physical(torch.full_like(tb, -50.0).double(), b, torch.full_like(tb, -1.0))
    assert (closed[:, 0] == 0).all()
    open_negative = model.to_physical(torch.full_like(tb, -50.0).double(), b, torch.full_like(tb, 1.0))
    assert (open_negative[:, 0] == 0).all()  # max(y, 0)


@pytest.fixture(scope="module")
def trained_qm9(qm9_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = _cfg("train.epochs=2", "finetune.targets=[gap_Ha, U0_Ha]")
    finetune(qm9_shards, out, cfg)
    return out


def test_finetune_writes_model_dir_and_metrics(trained_qm9):
    rows = list(csv.DictReader(open(trained_qm9 / "metrics.csv")))
    assert len(rows) == 2 and "val_mae_gap_Ha" in rows[0]
    conf = json.loads((trained_qm9 / "best" / "config.json").read_text())
    assert conf["finetune"]["loss"] == "mse"  # finetune.loss auto, resolved for molecules
    assert [t["name"] for t in conf["targets"]] == ["gap_Ha", "U0_Ha"]
    assert conf["targets"][1]["extensive"] and conf["targets"][0]["unit"] == "Ha"
    assert conf["featurization"]["atom_columns"][0] == "Z"


def test_save_load_predict_identity(trained_qm9, qm9_shards):
    model = load_model(trained_qm9)
    ds = ShardDataset(qm9_shards)
    recs = [ds[i] for i in range(10)]
    for r in recs:
        r["y"] = r["y"][[ds.targets.index("gap_Ha"), ds.targets.index("U0_Ha")]]
    direct = model.predict(collate(recs)).numpy()
    out = trained_qm9.parent / "pred.csv"
    files = [str(f) for f in qm9_files(10)]
    predict(trained_qm9, files, out)
    rows = list(csv.DictReader(open(out)))
    got = np.array([[float(r["gap_Ha"]), float(r["U0_Ha"])] for r in rows])
    np.testing.assert_allclose(got, direct, rtol=1e-6)
    assert abs(got[:, 1] - np.array([r["y"][1] for r in recs])).mean() < 2.0  # element refs put U0 near truth


def test_predict_bad_file_gives_error_row_and_other_rows(trained_qm9, tmp_path):
    good = qm9_files(3)
    bad = tmp_path / "dsgdb9nsd_999999.xyz"
    bad.write_text("\n".join(good[1].read_text().splitlines()[:3]))  # truncated real file
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(trained_qm9), str(good[0]), str(bad),
                        str(good[2]), str(tmp_path / "nothing.xyz"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out)))
    assert [bool(x["error"]) for x in rows] == [False, True, False, True]
    assert "truncated" in rows[1]["error"] and rows[1]["gap_Ha"] == ""
    assert float(rows[0]["gap_Ha"]) > 0


def test_evaluate_writes_metrics_and_parity_plots(trained_qm9, qm9_shards, tmp_path):
    m = evaluate(trained_qm9, qm9_shards, "all", tmp_path / "ev")
    assert m["records"] == 300 and m["targets"]["gap_Ha"]["count"] == 300
    assert m["targets"]["gap_Ha"]["unit"] == "Ha"
    # metrics.json agrees with the predictions it was computed from, recomputed here independently
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    err = np.array([float(r["gap_Ha_pred"]) - float(r["gap_Ha_true"]) for r in rows])
    assert len(rows) == 300
    assert m["targets"]["gap_Ha"]["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
    assert m["targets"]["gap_Ha"]["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-9)
    png = (tmp_path / "ev" / "parity_gap_Ha.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # each row names its structure and source file; metrics.csv is metrics.json as a table
    by_id = {r["_id"]: r["_source"] for r in ShardDataset(qm9_shards)}
    assert all(r["source"] == by_id[r["id"]] and r["source"].endswith(f"dsgdb9nsd_{r['id']}.xyz") for r in rows)
    table = {r["target"]: r for r in csv.DictReader(open(tmp_path / "ev" / "metrics.csv"))}
    assert list(table) == ["gap_Ha", "U0_Ha"] and table["gap_Ha"]["unit"] == "Ha"
    assert float(table["gap_Ha"]["mae"]) == m["targets"]["gap_Ha"]["mae"] and int(table["U0_Ha"]["count"]) == 300


def test_evaluate_limit_scores_the_first_records_of_the_split(trained_qm9, qm9_shards, tmp_path):
    from finetune.modeldata import split_indices

    full = evaluate(trained_qm9, qm9_shards, "test", tmp_path / "full")
    some = evaluate(trained_qm9, qm9_shards, "test", tmp_path / "some", limit=7)
    assert some["records"] == 7 and full["records"] > 7
    first = list(csv.DictReader(open(tmp_path / "full" / "predictions.csv")))[:7]
    assert [r["id"] for r in csv.DictReader(open(tmp_path / "some" / "predictions.csv"))] == [r["id"] for r in first]
    assert split_indices(qm9_shards, "all", 5) == [0, 1, 2, 3, 4]
    with pytest.raises(MolmatError, match="--limit"):
        split_indices(qm9_shards, "test", 0)


def test_evaluate_cli_writes_resolved_config_and_same_metrics(trained_qm9, qm9_shards, tmp_path):
    out = tmp_path / "ev_cli"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", str(trained_qm9), "--data", str(qm9_shards),
                        "--split", "all", "--out", str(out), "--set", "train.threads=1", "--set", "train.device=cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["train"]["threads"] == 1 and resolved["train"]["device"] == "cpu"
    header, *lines = [line.split() for line in r.stdout.splitlines()[1:4]]
    assert header == ["target", "unit", "MAE", "RMSE", "R2", "n"] and [x[0] for x in lines] == ["gap_Ha", "U0_Ha"]
    direct = evaluate(trained_qm9, qm9_shards, "all", tmp_path / "ev_py")
    got = json.loads((out / "metrics.json").read_text())
    assert got["targets"]["gap_Ha"]["mae"] == pytest.approx(direct["targets"]["gap_Ha"]["mae"], rel=1e-9)


def test_featurisation_check_compares_what_the_model_reads(trained_qm9, qm9_shards, tmp_path):
    from pipeline.preprocess import preprocess

    other = tmp_path / "other"
    preprocess([str(DATASETS / "qm9" / "xyz")], other, load_config(None, ["preprocess.molecule.cutoff=4.0"]), workers=0)
    # a 2D-only model never reads the 3D neighbour graph: another 3D cutoff gives the same graphs and numbers
    same = evaluate(trained_qm9, other, "test", tmp_path / "e1")
    ref = evaluate(trained_qm9, qm9_shards, "test", tmp_path / "e2")
    assert same["targets"]["gap_Ha"]["mae"] == ref["targets"]["gap_Ha"]["mae"]
    # a model directory that claims other atom feature columns is refused, naming the setting
    model_dir = tmp_path / "model"
    shutil.copytree(trained_qm9 / "best", model_dir)
    conf = json.loads((model_dir / "config.json").read_text())
    conf["featurization"]["atom_columns"] = conf["featurization"]["atom_columns"][:-1]
    (model_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MolmatError, match="atom_columns: model"):
        evaluate(model_dir, other, "test", tmp_path / "e3")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_then_rerun_gives_the_same_weights(qm9_shards, tmp_path, workers):
    """Kill a run with SIGTERM mid-training; re-running the command ends with identical weights.

    With loader workers the signal goes to the whole process group, as Slurm signals every
    process of a job: the workers must not die under the trainer before it has saved.
    """
    import os
    import signal
    import time

    args = ["--data", str(qm9_shards), "--set", "train.epochs=6", "--set", "finetune.targets=[gap_Ha]",
            "--set", "model.mpnn.dropout=0.1", "--set", f"train.num_workers={workers}"] + \
        [x for kv in SMALL for x in ("--set", kv)]
    cli = [sys.executable, "-m", "pipeline.cli", "finetune"]
    full = subprocess.run(cli + args + ["--out", str(tmp_path / "full")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    proc = subprocess.Popen(cli + args + ["--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (part / "metrics.csv").exists():
        time.sleep(0.005)
    if workers:
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        while time.time() < deadline and os.path.exists(children) and not open(children).read().strip():
            time.sleep(0.005)  # signal while loader workers are alive
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 75, err  # EX_TEMPFAIL: the sbatch templates requeue on it
    assert "killed by signal" not in err, err
    state = torch.load(part / "last.pt", weights_only=True)["state"]
    assert state["epoch"] < 6, "the signal must arrive before training ends"
    again = subprocess.run(cli + args + ["--out", str(part)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert (tmp_path / "full" / "best" / "model.safetensors").exists() and (part / "best" / "model.safetensors").exists()


def test_crystal_multitask_with_3d_encoder(mp_shards, tmp_path):
    cfg = _cfg("train.epochs=1", "model.encoder3d.name=schnet", "model.encoder3d.cutoff=8.0", "model.encoder3d.hidden=16")
    finetune(mp_shards, tmp_path / "mp", cfg)
    # finetune.loss auto, resolved for crystals, recorded where curvature and resumes read it
    assert json.loads((tmp_path / "mp" / "best" / "config.json").read_text())["finetune"]["loss"] == "l1"
    assert json.loads((tmp_path / "mp" / "run.json").read_text())["finetune"]["loss"] == "l1"
    # train.lr and batch_size auto, resolved for crystals (train.by_kind; the batch size set is kept) and recorded
    train = yaml.safe_load((tmp_path / "mp" / "config.resolved.yaml").read_text())["train"]
    assert (train["lr"], train["batch_size"]) == (0.002, 32)
    m = evaluate(tmp_path / "mp", mp_shards, "test")
    assert set(m["targets"]) == {"band_gap_eV", "formation_energy_per_atom_eV", "K_VRH_GPa", "G_VRH_GPa"}
    assert m["targets"]["K_VRH_GPa"]["count"] < m["targets"]["band_gap_eV"]["count"]
    assert "log10" in m["targets"]["K_VRH_GPa"]
    # the gated band gap: never negative, the gate's report agrees with the predictions file
    gate = m["targets"]["band_gap_eV"]["gate"]
    rows = list(csv.DictReader(open(tmp_path / "mp" / "eval_test" / "predictions.csv")))
    pred = np.array([float(r["band_gap_eV_pred"]) for r in rows])
    assert (pred >= 0).all() and gate["predicted_zero"] == int((pred == 0).sum())
    assert gate["true_zero"] == sum(float(r["band_gap_eV_true"]) == 0 for r in rows)
    out = tmp_path / "p.csv"
    mp_id, text = next(iter(mp_cif_texts(1).items()))
    cif = tmp_path / f"{mp_id}.cif"
    cif.write_text(text)
    predict(tmp_path / "mp", [str(cif)], out)
    row = next(csv.DictReader(open(out)))
    assert row["error"] == ""
    # the CSV holds the model's prediction for that crystal, in GPa (not log10), as evaluate computes it
    ds = ShardDataset(mp_shards)
    rec = next(ds[i] for i in range(len(ds)) if ds[i]["_id"] == cif.stem)
    model = load_model(tmp_path / "mp")
    expected = model.predict(collate([dict(rec, y=rec["y"][:len(model.targets)])]))[0]
    got = [float(row[t.name]) for t in model.targets]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_max_train_uses_a_nested_seeded_subset(qm9_shards, tmp_path):
    for n in (40, 80):
        finetune(qm9_shards, tmp_path / f"n{n}", _cfg("train.epochs=1", "finetune.targets=[gap_Ha]", f"finetune.max_train={n}"))
        state = torch.load(tmp_path / f"n{n}" / "last.pt", weights_only=True)["state"]
        assert state["step"] == -(-n // 32)  # one epoch over n records in batches of 32


@pytest.mark.slow
def test_molmat_run_end_to_end(tmp_path):
    """The README's main command on the shipped samples, with tiny budgets: every stage's output,
    a rerun that skips every completed step, and one that redoes only what was removed."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--out", str(run), "--set", "run.finetune_minutes=0.05",
           "--set", "run.pretrain_minutes=0.05", "--set", "train.threads=1"] + [x for kv in SMALL for x in ("--set", kv)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    outputs = [run / "data" / ds / "manifest.json" for ds in ("qm9", "mp")]
    outputs += [run / "pretrain" / f for f in ("result.json", "model.safetensors", "learning_curve.png")]
    for ds in ("qm9", "mp"):
        for arm in ("pretrained", "scratch"):
            model = run / "models" / ds / arm
            outputs += [model / "result.json", model / "best" / "model.safetensors", model / "learning_curve.png"]
            outputs += [model / "eval_test" / f for f in ("metrics.json", "metrics.csv", "predictions.csv")]
        conf = json.loads((run / "models" / ds / "pretrained" / "best" / "config.json").read_text())
        assert conf["init"] == str(run / "pretrain")
        assert json.loads((run / "models" / ds / "scratch" / "best" / "config.json").read_text())["init"] is None
    missing = [str(p.relative_to(run)) for p in outputs if not p.exists()]
    assert not missing, missing
    summary = (run / "summary.md").read_text()
    stages = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and " ran (" in line]
    assert stages == ["preprocess"] * 2 + ["pretrain"] + ["finetune", "evaluate"] * 4
    assert "| mp | band_gap_eV | eV |" in summary  # pretrained vs scratch table
    # model slots on auto: the molecules get the MPNN, the crystals the crystal default (3D only)
    rows = [line.split("|") for line in summary.splitlines() if line.startswith("| finetune |")]
    assert len(rows) == 4
    assert all("mpnn (2D), mse loss, lr 0.001, batch 32: best val" in r[5] for r in rows if r[2].strip().startswith("qm9")), summary
    # crystals: PaiNN from scratch; from the encoder, its pretrained 3D encoder (SchNet); the crystal loss (l1)
    # and the lr and batch size (train.by_kind, the batch size set above anyway)
    mp_rows = {r[4].strip().split("/")[-1]: r[5] for r in rows if r[2].strip().startswith("mp")}
    assert "painn (3D), l1 loss, lr 0.002, batch 32: best val" in mp_rows["scratch"], summary
    assert "schnet (3D), l1 loss, lr 0.002, batch 32: best val" in mp_rows["pretrained"], summary
    assert "test MAE homo_Ha" in r.stdout and "val contrastive accuracy" in r.stdout

    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("; skipped") == 11 and "running" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs} == before

    # fine-tuning runs without result.json (killed) or stopped by a signal resume from last.pt, then are
    # evaluated again; the other steps stay skipped
    killed, stopped = run / "models" / "qm9" / "scratch", run / "models" / "mp" / "scratch"
    (killed / "result.json").unlink()
    result = json.loads((stopped / "result.json").read_text())
    (stopped / "result.json").write_text(json.dumps(dict(result, stopped_by="signal")))
    third = subprocess.run(cmd, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("; skipped") == 7 and third.stderr.count("resuming from") == 2
    for model, name in ((killed, "qm9 (scratch)"), (stopped, "mp (scratch)")):
        assert f"[finetune] {name}: running" in third.stdout and f"[evaluate] {name}: running" in third.stdout
        assert json.loads((model / "result.json").read_text())["stopped_by"] != "signal"
        assert (model / "eval_test" / "metrics.json").stat().st_mtime_ns > before[model / "eval_test" / "metrics.json"]


def test_trainer_restores_signal_handlers(qm9_shards, tmp_path):
    """A trainer's SIGTERM flag handler must not outlive fit(): forked pools rely on SIGTERM killing."""
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    finetune(qm9_shards, tmp_path / "r", _cfg("train.epochs=1", "finetune.targets=[gap_Ha]", "finetune.max_train=32"))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_empty_validation_split_is_refused(qm9_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(qm9_shards, copy)
    split = json.loads((copy / "split.json").read_text())
    (copy / "split.json").write_text(json.dumps(dict(split, train=split["train"] + split["val"], val=[])))
    with pytest.raises(MolmatError, match=r"empty val split.*split\.val=0\.1"):
        finetune(copy, tmp_path / "run", _cfg("train.epochs=1"))


def test_cosine_schedule_is_fitted_to_the_time_budget():
    from pipeline.config import TrainConfig
    from pipeline.training import _Schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = _Schedule(opt, TrainConfig(epochs=1000, warmup_steps=0, max_minutes=1.0, min_lr=0.0), 100_000)
    # 200 steps in 20 s of a 60 s budget: about 600 steps fit; the learning rate reaches min_lr there
    sched.fit_budget(200, 20.0, 60.0)
    assert sched.total == 600
    sched.step(300)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3, rel=1e-6)
    sched.step(600)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    restored = _Schedule(opt, TrainConfig(epochs=1000, max_minutes=1.0), 100_000)
    restored.load_state_dict(sched.state_dict())
    assert restored.total == 600
    sched.fit_budget(200, 0.01, 60.0)  # 1.2M steps would fit: never beyond train.epochs
    assert sched.total == 100_000


def test_a_budget_that_shortens_the_run_shortens_the_warm_up():
    """A short budgeted run (molmat run) must reach its peak learning rate, not end while warming up."""
    from pipeline.config import TrainConfig
    from pipeline.training import _Schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = _Schedule(opt, TrainConfig(epochs=100, warmup_steps=100, max_minutes=1.0, min_lr=0.0), 4 * 100)
    sched.step(20)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 21 / 40)  # 400 planned steps: 40 of warm-up
    sched.fit_budget(12, 6.0, 60.0)  # 12 steps in 6 s of 60 s: the run will end after 120 steps
    assert sched.total == 120
    sched.step(11)  # warm-up is now a tenth of 120 steps: the peak is reached at step 11 (not 12/40 of it)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    sched.step(66)  # the cosine's midpoint between warm-up end (12) and the end (120)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_predict_refuses_a_crystal_for_a_molecule_model_and_flags_new_elements(trained_qm9, qm9_shards, tmp_path):
    from finetune.predict import domain_check

    (mp_id, cif), = mp_cif_texts(1).items()
    (tmp_path / f"{mp_id}.cif").write_text(cif)
    out = tmp_path / "p.csv"
    predict(trained_qm9, [str(qm9_files(1)[0]), str(tmp_path / f"{mp_id}.cif")], out)
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["error"] == "" and rows[0]["warning"] == "" and float(rows[0]["gap_Ha"]) > 0
    assert rows[1]["error"] == "model was trained on molecules, this input is a crystal" and rows[1]["gap_Ha"] == ""
    rec = next(r for r in ShardDataset(qm9_shards) if 6 in r["z"] and 1 in r["z"])
    assert domain_check(rec, {"kinds": ["molecule"], "elements": ["H", "N", "O", "F"]}) == (
        "", "element(s) C not in the training data; the prediction is an extrapolation")
    assert domain_check(rec, {"kinds": ["molecule"], "elements": ["H", "C", "N", "O", "F"]}) == ("", "")


def test_lr_and_batch_size_auto_by_kind_and_explicit_choice_wins():
    cfg = load_config(None, [])
    assert (cfg.train.lr, cfg.train.batch_size) == ("auto", "auto") and not cfg.train.is_resolved()
    crystal, molecule = cfg.train.resolve(["crystal"]), cfg.train.resolve(["molecule"])
    assert (crystal.lr, crystal.batch_size) == (0.002, 32) and crystal.is_resolved()
    assert (molecule.lr, molecule.batch_size) == (0.001, 64)
    other = load_config(None, ["train.by_kind.crystal={lr: 0.0005, batch_size: 16}"]).train
    assert (other.resolve(["crystal"]).lr, other.resolve(["crystal"]).batch_size) == (0.0005, 16)
    assert other.resolve(["molecule"]).batch_size == 64
    mixed = cfg.train.resolve(["crystal", "molecule"])  # mixed data: the molecule default
    assert (mixed.lr, mixed.batch_size) == (0.001, 64)
    mine = load_config(None, ["train.lr=0.0005", "train.by_kind.crystal.batch_size=16"]).train.resolve(["crystal"])
    assert (mine.lr, mine.batch_size) == (0.0005, 16)
    for bad in ("train.lr=-1", "train.batch_size=0", "train.lr=fast"):
        with pytest.raises(MolmatError, match="train"):
            load_config(None, [bad])


def test_a_plain_painn_at_the_crystal_lr_is_warned_about(caplog):
    from finetune.train import warn_unstable_painn

    crystal = load_config(None, []).train.resolve(["crystal"]).lr
    default = load_config(None, []).model.resolve(["crystal"])
    plain = load_config(None, ["model.encoder3d={name: painn, cutoff: 8.0}"]).model.resolve(["crystal"])
    schnet = load_config(None, ["model.encoder3d.name=schnet"]).model.resolve(["crystal"])
    with caplog.at_level("WARNING", logger="molmat.finetune"):
        assert not warn_unstable_painn(default, crystal)  # the crystal default has block_norm
        assert not warn_unstable_painn(plain, 0.001) and not warn_unstable_painn(schnet, crystal)
        assert not caplog.records
        assert warn_unstable_painn(plain, crystal)
    assert "block_norm=true" in caplog.records[-1].getMessage()


def test_the_trainer_refuses_an_unresolved_config(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.training import Trainer

    with pytest.raises(MolmatError, match="still 'auto'"):
        Trainer(torch.nn.Linear(1, 1), None, [], [], TrainConfig(), tmp_path)


def test_a_resume_with_another_batch_size_is_refused(qm9_shards, tmp_path):
    """The position within an epoch is counted in batches: resuming with another size would skip
    other records, so it is refused with the size to resume with (what an auto size change could do)."""
    run = tmp_path / "run"
    finetune(qm9_shards, run, _cfg("train.epochs=1", "finetune.targets=[gap_Ha]"))
    with pytest.raises(MolmatError, match="train.batch_size=32; this run has 16. Resume with --set train.batch_size=32"):
        finetune(qm9_shards, run, _cfg("train.epochs=2", "finetune.targets=[gap_Ha]", "train.batch_size=16"))
    finetune(qm9_shards, run, _cfg("train.epochs=2", "finetune.targets=[gap_Ha]"))  # the same size resumes
    assert json.loads((run / "result.json").read_text())["epochs_run"] == 2


def test_loss_auto_by_kind_and_explicit_choice_wins():
    cfg = load_config(None, [])
    assert cfg.finetune.loss == "auto"
    assert cfg.finetune.resolved_loss(["crystal"]) == "l1"
    assert cfg.finetune.resolved_loss(["molecule"]) == "mse"
    assert cfg.finetune.resolved_loss(["crystal", "molecule"]) == "mse"  # mixed data: the molecule default
    assert load_config(None, ["finetune.loss=huber"]).finetune.resolved_loss(["crystal"]) == "huber"
    assert load_config(None, ["finetune.loss_by_kind.crystal=mse"]).finetune.resolved_loss(["crystal"]) == "mse"
