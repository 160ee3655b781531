"""The moving average of the weights (``train.ema_decay``, :mod:`pipeline.ema`): its arithmetic
against a hand-written recursion in float64, the swap in and out of the model, and a fine-tuning
run that validates and saves the average and resumes it after a stop as if never stopped."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from helpers import stop_mid_epoch
from pipeline.config import load_config
from pipeline.ema import WeightAverage

TINY = ["model.encoder2d.hidden=8", "model.encoder2d.steps=1", "model.encoder2d.set2set_iters=1",
        "model.heads.hidden=8", "train.batch_size=32", "train.warmup_steps=0", "train.log_every=1000",
        "train.threads=1", "train.device=cpu", "finetune.targets=[gap_Ha]", "train.ema_decay=0.9"]


def test_the_average_follows_the_warmed_up_recursion():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.9)
    ref = [p.detach().double().numpy().copy() for p in model.parameters()]
    for t in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))  # ramps 0.1, 0.18, ... and stays at 0.9 from t = 80
        ref = [d * r + (1 - d) * p.detach().double().numpy() for r, p in zip(ref, model.parameters())]
    for a, r in zip(ema.average, ref):
        np.testing.assert_allclose(a.double().numpy(), r, rtol=1e-5, atol=1e-6)
    assert ema.current_decay() == 0.9


def test_swapped_holds_the_average_and_gives_the_live_weights_back_also_on_error():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 4)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update()
    live, average = model.weight.detach().clone(), ema.average[0].clone()
    assert not torch.equal(average, live)
    with ema.swapped():
        assert torch.equal(model.weight.detach(), average)
    assert torch.equal(model.weight.detach(), live) and torch.equal(ema.average[0], average)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped():
            raise RuntimeError("boom")
    assert torch.equal(model.weight.detach(), live) and torch.equal(ema.average[0], average)


def test_a_bad_decay_and_a_mismatched_state_are_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightAverage(model, 1.0)
    state = WeightAverage(torch.nn.Linear(3, 2), 0.9).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(model, 0.9).load_state_dict(state)


def test_a_finetune_run_saves_the_average_and_resumes_it_exactly(qm9_shards, tmp_path):
    from finetune.train import finetune
    from pipeline.checkpoint import load_weights

    # one epoch: best/ is that epoch's model, and it must be the average, not the live weights
    one = finetune(qm9_shards, tmp_path / "one", load_config(None, TINY + ["train.epochs=1"]))
    last = torch.load(tmp_path / "one" / "last.pt", map_location="cpu", weights_only=True)
    assert last["ema"]["updates"] == one.steps > 5
    saved = load_weights(tmp_path / "one" / "best", "property")
    for a in last["ema"]["average"]:
        assert any(s.shape == a.shape and torch.equal(s, a) for s in saved.values()), "an average is not in best/"
    heads = [k for k in saved if k.startswith("heads.")]
    assert heads and not any(torch.equal(saved[k], last["model"][k]) for k in heads), "best/ holds live weights"

    cfg = load_config(None, TINY + ["train.epochs=2"])
    finetune(qm9_shards, tmp_path / "whole", cfg)

    assert finetune(qm9_shards, tmp_path / "cut", cfg, callbacks=(stop_mid_epoch(1, 2),)).stopped_by == "signal"
    finetune(qm9_shards, tmp_path / "cut", cfg)
    rows = [list(csv.DictReader(open(tmp_path / run / "metrics.csv"))) for run in ("whole", "cut")]
    assert [r["val_mae_gap_Ha"] for r in rows[1]] == [r["val_mae_gap_Ha"] for r in rows[0]]
    resumed = load_weights(tmp_path / "cut" / "best", "property")
    for k, v in load_weights(tmp_path / "whole" / "best", "property").items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)


def test_switching_the_average_on_for_a_resumed_run_starts_it_from_the_resumed_weights(qm9_shards, tmp_path, caplog):
    from finetune.train import finetune

    plain = [o for o in TINY if not o.startswith("train.ema_decay")]
    finetune(qm9_shards, tmp_path / "run", load_config(None, plain + ["train.epochs=1"]))
    with caplog.at_level("WARNING"):
        finetune(qm9_shards, tmp_path / "run", load_config(None, TINY + ["train.epochs=2"]))
    assert "holds no weight average" in caplog.text
