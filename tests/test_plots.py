"""Pictures: learning curves written by every training run, parity plots with a density view for many points."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np

from pipeline.config import load_config
from pipeline.plots import HEXBIN_ABOVE, LEARNING_CURVE, LearningCurveCallback, parity_plot, plot_learning_curve
from pipeline.shards import ShardDataset

SMALL = ["model.encoder2d.hidden=16", "model.encoder2d.steps=2", "model.heads.hidden=16", "train.batch_size=32",
         "train.warmup_steps=2", "train.log_every=1000", "train.epochs=3"]


def _image(path):
    """The PNG at ``path`` as an (H, W, C) array; fails on anything that is not a whole PNG."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.rstrip().endswith(b"IEND\xaeB`\x82")
    return matplotlib.image.imread(path)


def _assert_drawn(path):
    """A non-empty picture: more than one colour, so something was drawn on the white background."""
    img = _image(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 10


def test_finetune_writes_a_learning_curve_with_loss_monitor_and_lr(qm9_shards, tmp_path):
    from finetune.train import finetune

    run = tmp_path / "run"
    finetune(qm9_shards, run, load_config(None, SMALL + ["finetune.targets=[gap_Ha, U0_Ha]"]))
    _assert_drawn(run / LEARNING_CURVE)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # written through a renamed temp file
    panels = plot_learning_curve(run / "metrics.csv", tmp_path / "again.png", "val_mae_scaled")
    assert panels == ["loss", "monitor", "lr"]


def test_pretrain_learning_curve_shows_contrastive_accuracy(qm9_shards, mp_shards, tmp_path):
    from pretrain.train import pretrain

    enc = tmp_path / "enc"
    pretrain([qm9_shards, mp_shards], enc, load_config(None, SMALL + ["train.epochs=2"]))
    _assert_drawn(enc / LEARNING_CURVE)
    header = next(csv.reader(open(enc / "metrics.csv")))
    assert "val_accuracy" in header and "val_loss" in header
    # the monitored val_loss is drawn with the training loss; accuracy gets its own panel
    assert plot_learning_curve(enc / "metrics.csv", tmp_path / "p.png", "val_loss") == ["loss", "accuracy", "lr"]


def test_learning_curve_redraws_are_skipped_when_drawing_would_dominate_and_the_end_draws_all(qm9_shards, tmp_path):
    """The callback on its own: first epoch drawn, a redraw too soon skipped, the final curve always drawn."""
    from finetune.train import finetune

    run = tmp_path / "run"
    finetune(qm9_shards, run, load_config(None, SMALL + ["train.epochs=2", "finetune.targets=[gap_Ha]"]))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    fake = SimpleNamespace(out=tmp_path / "fake", task=SimpleNamespace(monitor="val_mae_scaled"))
    fake.out.mkdir()
    metrics = fake.out / "metrics.csv"

    def write(n):
        with open(metrics, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[:n])

    cb = LearningCurveCallback(budget=1e9)  # any redraw after the first is "too soon"
    write(1)
    cb.on_save_start(fake, "last")
    first = (fake.out / LEARNING_CURVE).read_bytes()
    cb.on_save_start(fake, "best")            # only the epoch's last.pt triggers a drawing
    write(2)
    cb.on_save_start(fake, "last")
    assert (fake.out / LEARNING_CURVE).read_bytes() == first
    cb.on_fit_end(fake, None)
    assert (fake.out / LEARNING_CURVE).read_bytes() != first
    _assert_drawn(fake.out / LEARNING_CURVE)


def test_a_learning_curve_that_cannot_be_drawn_does_not_stop_training(qm9_shards, tmp_path, monkeypatch, caplog):
    import pipeline.plots
    from finetune.train import finetune

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(pipeline.plots, "plot_learning_curve", broken)
    with caplog.at_level("WARNING", logger="molmat.plots"):
        result = finetune(qm9_shards, tmp_path / "run", load_config(None, SMALL + ["finetune.targets=[gap_Ha]"]))
    assert result.epochs_run == 3 and not (tmp_path / "run" / LEARNING_CURVE).exists()
    assert caplog.text.count("could not draw") == 1


def test_parity_plot_switches_to_a_density_view_for_many_points(mp_shards, tmp_path):
    ds = ShardDataset(mp_shards)
    gap = np.array([r["y"][ds.targets.index("band_gap_eV")] for r in ds])  # 300 real MP band gaps
    # predictions: the labels shifted by a fraction of their own spread (deterministic)
    pred = gap + 0.1 * np.std(gap) * np.sin(np.arange(len(gap)))
    metrics = {"mae": 0.1, "r2": 0.9, "count": len(gap)}
    assert parity_plot(pred, gap, "band_gap_eV", "eV", tmp_path / "few.png", metrics=metrics) == "scatter"
    many = int(np.ceil((HEXBIN_ABOVE + 1) / len(gap)))
    kind = parity_plot(np.tile(pred, many), np.tile(gap, many), "band_gap_eV", "eV", tmp_path / "many.png",
                       metrics=metrics)
    assert kind == "hexbin"
    for name in ("few.png", "many.png"):
        _assert_drawn(tmp_path / name)
    moduli = np.array([r["y"][ds.targets.index("K_VRH_GPa")] for r in ds])
    moduli = moduli[np.isfinite(moduli)]
    kind = parity_plot(np.tile(moduli, 40), np.tile(moduli, 40), "K_VRH_GPa", "GPa", tmp_path / "log.png", log=True)
    assert kind == "hexbin"
    _assert_drawn(tmp_path / "log.png")
