#!/usr/bin/env python3
"""Crystal encoders against composition baselines on Materials Project (issue 11).

Every model trains under the same wall-clock budget on one torch thread (``--jobs`` runs go side
by side, one core each), for each seed, and is scored on the seeded test split of the shards:

* molmat encoders through ``molmat finetune`` / ``molmat evaluate``: ``mpnn`` (2D neighbour
  topology), ``schnet`` and ``painn`` (3D, cutoff 8 A), ``both`` (MPNN + SchNet); with the default
  heads (band gap gated, formation energy on a composition baseline) and, as an ablation,
  ``*_plain`` (neither);
* composition baselines on element fractions (Z 1..94): ridge (closed form), a 2x256 MLP (same
  budget), and a random forest (scikit-learn, when importable; 300 trees).

Pools: ``full`` (every training record of the shards) and ``<N>k``, e.g. ``8k`` (a seeded
N,000-record subset of the same training split: ``finetune.max_train=N000``; MP only); validation
and test splits are the same for every pool, so the pools are directly comparable.

    .venv/bin/python bench/bench_crystal.py --mp SHARDS [--elastic SHARDS] --minutes 20 --seeds 0,1 --jobs 2

Runs are kept under ``--work`` and reused when complete (a killed benchmark resumes). Writes
``crystal_encoders.json`` and ``crystal_encoders.md`` into ``--results``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MOLMAT = str(ROOT / ".venv" / "bin" / "molmat")
BENCHLIB = "/tmp/benchlib"  # where scikit-learn may be installed for the random forest

TARGETS = {"mp": ["band_gap_eV", "formation_energy_per_atom_eV"], "mp_elastic": ["K_VRH_GPa", "G_VRH_GPa"]}
LOG10 = {"K_VRH_GPa", "G_VRH_GPa"}
UNITS = {"band_gap_eV": "eV", "formation_energy_per_atom_eV": "eV/atom", "K_VRH_GPa": "log10(GPa)",
         "G_VRH_GPa": "log10(GPa)"}
PLAIN = ["finetune.gated_targets=[]", "finetune.composition_baseline_targets=[]"]
#: The encoders with the squared-error loss, learning rate and batch size they were first measured
#: with (``finetune.loss`` is ``auto`` = l1 for crystals since, ``*_l1`` rows use that; ``train.lr``
#: and ``train.batch_size`` are ``auto`` since, which ``train.by_kind`` makes the same values).
OPTIM = ["train.lr=0.001", "train.batch_size=64"]
MODELS: dict[str, list[str]] = {
    "mpnn": ["model.encoder2d.name=mpnn", "model.encoder3d=null", "finetune.loss=mse"] + OPTIM,
    "schnet": ["model.encoder2d=null", "model.encoder3d={name: schnet, cutoff: 8.0}", "finetune.loss=mse"] + OPTIM,
    "painn": ["model.encoder2d=null", "model.encoder3d={name: painn, cutoff: 8.0}", "finetune.loss=mse"] + OPTIM,
    "both": ["model.encoder2d.name=mpnn", "model.encoder3d={name: schnet, cutoff: 8.0}", "finetune.loss=mse"] + OPTIM,
}
MODELS.update({f"{k}_plain": v + PLAIN for k, v in list(MODELS.items())})
#: Trained on the mean absolute error, the metric reported, instead of the squared error.
MODELS.update({f"{k}_l1": [x for x in v if not x.startswith("finetune.loss=")] + ["finetune.loss=l1"]
               for k, v in list(MODELS.items()) if not k.endswith("_plain")})
#: Without early stopping: the cosine schedule fitted to the budget runs to its end (on the 2.9k
#: elastic crystals, patience 30 stops a 20-minute run after ~5 minutes, its learning rate barely lowered).
MODELS.update({f"{k}_nostop": v + ["train.patience=null"] for k, v in list(MODELS.items()) if k.endswith("_l1")})
#: One model per target (each its own run and budget; two side by side are the 2-core budget): the curvature
#: benchmark measured multi-task MP formation energy 20% worse than single-task (bench/results/curvature.md).
SINGLE = {f"{k}_single": k for k in ("mpnn", "schnet", "painn", "schnet_l1", "painn_l1")}
MODELS.update({k: MODELS[v] for k, v in SINGLE.items()})
BASELINES = ("composition_ridge", "composition_mlp", "composition_rf")
#: Transfer learning: the elastic model starts from the encoder of the MP model of the same seed and
#: pool (``molmat finetune --init``); that MP run must exist (its own 20 minutes are not counted here).
MODELS["painn_l1_mpinit"] = MODELS["painn_l1"] + ["finetune.init={work}/runs/mp_{pool}_painn_l1_s{seed}"]
#: Optimisation at the 20-minute budget (~12 epochs on the full MP pool): smaller batches and a higher
#: learning rate. 2e-3 with 32 per batch was the most accurate and diverged in 3 of 7 runs, 3e-3 in
#: its second epoch: the edge of PaiNN's stability.
for _k, _sets in {"bs32": ["train.lr=0.001", "train.batch_size=32"], "lr2e-3": ["train.lr=0.002", "train.batch_size=64"],
                  "lr2e-3_bs32": ["train.lr=0.002", "train.batch_size=32"],
                  "lr3e-3_bs32": ["train.lr=0.003", "train.batch_size=32"]}.items():
    MODELS[f"painn_l1_{_k}"] = [x for x in MODELS["painn_l1"] if x not in OPTIM] + _sets
#: The same settings with ``block_norm`` PaiNN blocks (each block reads LayerNorm-ed scalars and
#: RMS-bounded vectors, so no state compounds through the blocks; PaiNNConfig.block_norm).
for _k in ("lr2e-3_bs32", "lr3e-3_bs32"):
    MODELS[f"painn_l1_bn_{_k}"] = [x.replace("cutoff: 8.0}", "cutoff: 8.0, block_norm: true}")
                                   for x in MODELS[f"painn_l1_{_k}"]]
#: The crystal default of 2026-12-07 (the row above at 2e-3) with one model per target.
SINGLE["painn_l1_bn_single"] = "painn_l1_bn_lr2e-3_bs32"
MODELS["painn_l1_bn_single"] = MODELS["painn_l1_bn_lr2e-3_bs32"]
#: The crystal default of 2026-12-07 with each atom's embedding starting from tabulated element
#: properties (PaiNNConfig.element_descriptors), and with the softmax readout besides (PaiNNConfig.readout).
MODELS["painn_l1_bn_elem"] = [x.replace("block_norm: true}", "block_norm: true, element_descriptors: true}")
                              for x in MODELS["painn_l1_bn_lr2e-3_bs32"]]
MODELS["painn_l1_bn_elem_softmax"] = [x.replace("element_descriptors: true}", "element_descriptors: true, readout: softmax}")
                                      for x in MODELS["painn_l1_bn_elem"]]
#: The same, 96 wide instead of 64 (1.4x slower per step: 9 epochs in the budget instead of 13).
MODELS["painn_l1_bn_elem_softmax_h96"] = [x.replace("readout: softmax}", "readout: softmax, hidden: 96}")
                                          for x in MODELS["painn_l1_bn_elem_softmax"]]
#: The element/softmax default with two interaction blocks instead of three (1.4x the steps), with
#: 16 per batch instead of 32 (twice the optimizer steps per epoch), and validated and saved as
#: a moving average of its weights (train.ema_decay).
MODELS["painn_l1_bn_elem_softmax_int2"] = [x.replace("readout: softmax}", "readout: softmax, interactions: 2}")
                                           for x in MODELS["painn_l1_bn_elem_softmax"]]
MODELS["painn_l1_bn_elem_softmax_bs16"] = [x.replace("train.batch_size=32", "train.batch_size=16")
                                           for x in MODELS["painn_l1_bn_elem_softmax"]]
MODELS["painn_l1_bn_elem_softmax_ema999"] = MODELS["painn_l1_bn_elem_softmax"] + ["train.ema_decay=0.999"]
#: Two blocks, trained on MP's total magnetic moment besides the two scored targets, as an auxiliary
#: target (extensive: learned per atom after fitted element references); only band gap and formation
#: energy are scored. A model's own ``finetune.targets`` replaces the scored list in its command.
MODELS["painn_l1_bn_elem_softmax_int2_mag"] = MODELS["painn_l1_bn_elem_softmax_int2"] + [
    "finetune.targets=[band_gap_eV,formation_energy_per_atom_eV,total_magnetization_muB]",
    "finetune.extensive_targets=[total_magnetization_muB]"]
#: Two blocks with more weight decay (AdamW, 0.05 instead of 1e-5: over the second half of the budget the
#: training loss falls to 40% while the validation error falls by 13%), and two blocks 96 or 128 wide instead of 64.
MODELS["painn_l1_bn_elem_softmax_int2_wd05"] = MODELS["painn_l1_bn_elem_softmax_int2"] + ["train.weight_decay=0.05"]
for _h in (96, 128):
    MODELS[f"painn_l1_bn_elem_softmax_int2_h{_h}"] = [x.replace("interactions: 2}", f"interactions: 2, hidden: {_h}}}")
                                                     for x in MODELS["painn_l1_bn_elem_softmax_int2"]]
#: Two blocks 96 wide with the band gap's loss (regressor and metal/non-metal gate) weighted twice the
#: formation energy's, and with three layers per head (gate and regressors) instead of two.
MODELS["painn_l1_bn_elem_softmax_int2_h96_bgw2"] = MODELS["painn_l1_bn_elem_softmax_int2_h96"] + [
    "finetune.loss_weights={band_gap_eV: 2.0}"]
MODELS["painn_l1_bn_elem_softmax_int2_h96_hl3"] = MODELS["painn_l1_bn_elem_softmax_int2_h96"] + ["model.heads.layers=3"]
#: Two blocks 96 wide with dropout 0.1 between the head layers (the training loss falls to a third of
#: the validation error's scale over the second half of the budget), and with ``train.compile``
#: (pipeline.compiled: ~1.5x the steps in the budget, same outputs), also 128 wide.
MODELS["painn_l1_bn_elem_softmax_int2_h96_hd1"] = MODELS["painn_l1_bn_elem_softmax_int2_h96"] + ["model.heads.dropout=0.1"]
for _h in (96, 128):
    MODELS[f"painn_l1_bn_elem_softmax_int2_h{_h}_comp"] = MODELS[f"painn_l1_bn_elem_softmax_int2_h{_h}"] + [
        "train.compile=true"]
#: The crystal default's three blocks, 96 wide, compiled (about the steps of the uncompiled two-block 96).
MODELS["painn_l1_bn_elem_softmax_h96_comp"] = MODELS["painn_l1_bn_elem_softmax_h96"] + ["train.compile=true"]
#: The compiled two-block 96 trained on MP's Fermi energy besides the two scored targets, as an
#: auxiliary target (a label of the same DFT runs; with the band gap it places the band edges).
MODELS["painn_l1_bn_elem_softmax_int2_h96_comp_ef"] = MODELS["painn_l1_bn_elem_softmax_int2_h96_comp"] + [
    "finetune.targets=[band_gap_eV,formation_energy_per_atom_eV,efermi_eV]"]
#: The same with the Fermi energy's loss weighted twice the scored targets'.
MODELS["painn_l1_bn_elem_softmax_int2_h96_comp_ef_w2"] = MODELS["painn_l1_bn_elem_softmax_int2_h96_comp_ef"] + [
    "finetune.loss_weights={efermi_eV: 2.0}"]
#: The compiled two-block 96 (``_comp``, two targets) without the metal/non-metal gate
#: (``finetune.gated_targets=[]``): one L1 regressor of the
#: band gap, whose optimum is the conditional median and so near zero for likely metals anyway.
MODELS["painn_l1_bn_elem_softmax_int2_h96_comp_nogate"] = MODELS["painn_l1_bn_elem_softmax_int2_h96_comp"] + [
    "finetune.gated_targets=[]"]
#: ``painn_l1`` again with the faster PaiNN of d1422e6 (same outputs, ~1.2x the steps in the budget):
#: the control that separates the optimisation settings above from the speed-up.
MODELS["painn_l1_d1422e6"] = MODELS["painn_l1"]
#: ``MODEL_ensN``: the ``molmat ensemble`` of N runs of MODEL, its seed s made of seeds N*s .. N*s+N-1.
#: Within the 2-core, 20-minute budget: two one-thread runs side by side (N = 2), or, where each run
#: ends sooner (the elastic pool's runs early-stop after ~5 minutes), two after two (N = 4).
ENSEMBLE = re.compile(r"^(?P<base>.+)_ens(?P<n>[2-9])$")


def log(msg: str) -> None:
    """Time-stamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_name(dataset: str, pool: str, model: str, seed: int) -> str:
    """Run directory name; a single-target job ``MODEL@TARGET`` becomes ``MODEL_TARGET``."""
    return f"{dataset}_{pool}_{model.replace('@', '_')}_s{seed}"


def pool_size(pool: str) -> int | None:
    """Training records a pool keeps: None for ``full``, N * 1000 for ``<N>k``."""
    if pool == "full":
        return None
    match = re.fullmatch(r"(\d+)k", pool)
    if not match:
        raise ValueError(f"unknown pool {pool!r}; expected full or <N>k (8k, 16k, ...)")
    return int(match[1]) * 1000


def split_scores(metrics: dict[str, Any], targets: list[str]) -> dict[str, dict[str, Any]]:
    """MAE, R2 and count per target from ``molmat evaluate``'s metrics.json (log10 for moduli)."""
    out = {}
    for t in targets:
        m = metrics["targets"][t]
        out[t] = {"mae": m["log10"]["mae"] if t in LOG10 else m["mae"],
                  "r2": m["log10"]["r2"] if t in LOG10 else m["r2"], "count": m["count"]}
    return out


def base_model(model: str) -> str:
    """The MODELS key a model name runs: itself, or for ``MODEL_ensN`` the MODEL its members are."""
    match = ENSEMBLE.match(model)
    return match["base"] if match else model


def run_failure(logf: Path, rc: int | None = None) -> str:
    """What a run without test metrics was, from its log: ``diverged`` (a result: a setting at the edge
    of stability, counted in the report), another failure (its exit status and log), or ``not run``."""
    if logf.exists() and "training diverged" in logf.read_text(errors="replace"):
        return "diverged"
    return f"rc {rc}, log {logf}" if rc is not None else "not run"


def molmat_run(dataset: str, shards: Path, model: str, pool: str, seed: int, minutes: float, work: Path) -> dict[str, Any]:
    """Fine-tune and evaluate one molmat model (reused when its evaluation already exists).

    ``model`` is a key of :data:`MODELS`, or ``KEY@TARGET`` for the one-target run of a ``*_single`` model.
    """
    base, _, only = model.partition("@")
    targets = [only] if only else TARGETS[dataset]
    run = work / "runs" / run_name(dataset, pool, model, seed)
    metrics_file = run / "eval_test" / "metrics.json"
    model_sets = [x.replace("{work}", str(work)).replace("{pool}", pool).replace("{seed}", str(seed)) for x in MODELS[base]]
    # a model that trains on more targets than the scored ones (auxiliary targets) names them itself
    trained = [] if any(x.startswith("finetune.targets=") for x in model_sets) else [
        "finetune.targets=[" + ",".join(targets) + "]"]
    sets = [f"train.max_minutes={minutes}", "train.epochs=1000", "train.threads=1", f"train.seed={seed}",
            *trained, *model_sets]
    keep = pool_size(pool)
    if keep is not None:
        sets.append(f"finetune.max_train={keep}")
    ft = ["finetune", "--data", str(shards), "--out", str(run)] + [a for s in sets for a in ("--set", s)]
    ev = ["evaluate", str(run), "--data", str(shards), "--split", "test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not metrics_file.exists():
        log(f"start {run.name}")
        logf = work / "logs" / f"{run.name}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        with open(logf, "w") as fh:
            rc = subprocess.call([MOLMAT, *ft, "--restart"], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if rc == 0:
                rc = subprocess.call([MOLMAT, *ev], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if rc != 0:
            return {"error": run_failure(logf, rc)}
        log(f"done {run.name}")
    metrics = json.loads(metrics_file.read_text())
    timing = json.loads((run / "timing.json").read_text())
    result = json.loads((run / "result.json").read_text())
    return {"per_target": split_scores(metrics, targets), "graphs_per_s": timing["graphs_per_s"], "epochs": result["epochs_run"],
            "stopped_by": result["stopped_by"], "run_dir": str(run),
            "command": shlex.join(["molmat", *ft]) + " && " + shlex.join(["molmat", *ev])}


def ensemble_run(dataset: str, shards: Path, model: str, pool: str, seed: int, minutes: float, work: Path) -> dict[str, Any]:
    """``molmat ensemble`` of the runs of seeds N*seed .. N*seed+N-1 of ``model``'s base (trained first
    when missing), evaluated on the test split; throughput and epochs are the members' means."""
    match = ENSEMBLE.match(model)
    base, n = match["base"], int(match["n"])
    members = [molmat_run(dataset, shards, base, pool, n * seed + k, minutes, work) for k in range(n)]
    bad = [m["error"] for m in members if "error" in m]
    if bad:
        return {"error": f"member failed: {bad[0]}"}
    run = work / "runs" / run_name(dataset, pool, model, seed)
    metrics_file = run / "eval_test" / "metrics.json"
    ens = ["ensemble", *(m["run_dir"] for m in members), "--out", str(run)]
    ev = ["evaluate", str(run), "--data", str(shards), "--split", "test"]
    if not metrics_file.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        logf = work / "logs" / f"{run.name}.log"
        with open(logf, "w") as fh:
            for cmd in (ens, ev):
                rc = subprocess.call([MOLMAT, *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                if rc != 0:
                    return {"error": f"rc {rc}, log {logf}"}
    metrics = json.loads(metrics_file.read_text())
    return {"per_target": split_scores(metrics, list(metrics["targets"])), "graphs_per_s": sum(m["graphs_per_s"] for m in members) / n,
            "epochs": sum(m["epochs"] for m in members) / n, "run_dir": str(run),
            "command": " && ".join(m["command"] for m in members) + " && " + shlex.join(["molmat", *ens])
            + " && " + shlex.join(["molmat", *ev])}


def composition_baseline(dataset: str, shards: Path, kind: str, pool: str, seed: int, minutes: float) -> dict[str, Any]:
    """Ridge, MLP or random forest on element fractions; same split (and pool subset) as molmat."""
    import numpy as np

    import bench_finetune as bf
    from finetune.modeldata import TargetColumns
    from pipeline.shards import ShardDataset, load_manifest
    from pipeline.splits import load_split

    targets = TARGETS[dataset]
    is_log = np.array([t in LOG10 for t in targets])
    manifest, split = load_manifest(shards), load_split(shards)
    names = [t["name"] for t in manifest["targets"]]
    cols = [names.index(t) for t in targets]
    train_idx = split["train"]
    keep = pool_size(pool)
    if keep is not None:  # the records finetune.max_train picks
        pick = np.random.default_rng(split["seed"]).permutation(len(train_idx))[:keep]
        train_idx = sorted(train_idx[i] for i in pick)
    ds = {k: TargetColumns(ShardDataset(shards, idx), cols)
          for k, idx in (("train", train_idx), ("val", split["val"]), ("test", split["test"]))}
    X, _ = bf._features(ds["train"], "composition")
    Xv, _ = bf._features(ds["val"], "composition")
    Xt, _ = bf._features(ds["test"], "composition")
    y_tr, y_va, y_te = bf._labels(ds["train"]), bf._labels(ds["val"]), bf._labels(ds["test"])
    T, M = bf._to_learned(y_tr, is_log)
    Tv, Mv = bf._to_learned(y_va, is_log)
    t0 = time.time()
    info: dict[str, Any] = {}
    if kind == "composition_ridge":
        coefs = bf._ridge(X, T, M, Xv, Tv, Mv)
        pred = np.stack([(Xt - xm) @ w + ym for (_, a, w, xm, ym) in coefs], axis=1)
    elif kind == "composition_rf":
        if BENCHLIB not in sys.path:
            sys.path.append(BENCHLIB)
        from sklearn.ensemble import RandomForestRegressor

        pred = np.zeros((len(Xt), len(targets)))
        for j in range(len(targets)):
            rf = RandomForestRegressor(n_estimators=300, n_jobs=1, random_state=seed)
            rf.fit(X[M[:, j]], T[M[:, j], j])
            pred[:, j] = rf.predict(Xt)
    else:
        import torch

        from finetune.losses import masked_loss

        torch.manual_seed(seed)
        mean = np.array([T[M[:, j], j].mean() for j in range(len(targets))])
        std = np.array([T[M[:, j], j].std() for j in range(len(targets))])
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                                  torch.nn.SiLU(), torch.nn.Linear(256, len(targets)))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
        Xtr, Yn, Mt = torch.from_numpy(X), torch.from_numpy(((T - mean) / std).astype(np.float32)), torch.from_numpy(M)
        best, best_state, start, epoch, bad = float("inf"), None, time.time(), 0, 0
        while time.time() - start < minutes * 60 and epoch < 1000 and bad < 30:  # molmat's default patience
            perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            for k in range(0, len(X), 64):
                idx = perm[k:k + 64]
                loss = masked_loss(net(Xtr[idx]), Yn[idx], Mt[idx], torch.ones(len(targets)), "mse")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                pv = net(torch.from_numpy(Xv)).numpy() * std + mean
            score, _ = bf._scaled_val(pv, y_va, is_log, std)
            if score < best:
                best, best_state, bad = score, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                bad += 1
            epoch += 1
        net.load_state_dict(best_state)
        with torch.no_grad():
            pred = net(torch.from_numpy(Xt)).numpy() * std + mean
        info["epochs"] = epoch
    info["fit_s"] = round(time.time() - t0, 1)
    metrics = bf._test_metrics(pred, y_te, is_log, targets)
    info["per_target"] = {t: {"mae": m["mae"], "r2": m["r2"], "count": m["count"]} for t, m in metrics.items()}
    return info


def _job(args: tuple) -> tuple[tuple, dict[str, Any]]:
    dataset, shards, model, pool, seed, minutes, work, report_only = args
    if report_only:
        done = (Path(work) / "baselines" / f"{dataset}_{pool}_{model}_s{seed}.json" if model in BASELINES else
                Path(work) / "runs" / run_name(dataset, pool, model, seed) / "eval_test" / "metrics.json")
        if not done.exists():
            return (dataset, model, pool, seed), {"error": run_failure(
                Path(work) / "logs" / f"{run_name(dataset, pool, model, seed)}.log")}
    try:
        if model in BASELINES:
            cache = Path(work) / "baselines" / f"{dataset}_{pool}_{model}_s{seed}.json"
            if cache.exists():
                out = json.loads(cache.read_text())
            else:
                log(f"start {cache.stem}")
                out = composition_baseline(dataset, Path(shards), model, pool, seed, minutes)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(out, indent=1))
        elif ENSEMBLE.match(model):
            out = ensemble_run(dataset, Path(shards), model, pool, seed, minutes, Path(work))
        else:
            out = molmat_run(dataset, Path(shards), model, pool, seed, minutes, Path(work))
    except Exception as exc:  # one failed model must not lose the others' results
        out = {"error": f"{type(exc).__name__}: {exc}"}
    return (dataset, model, pool, seed), out


def merge_single(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``*_single`` model and seed from its one-target runs (``MODEL@TARGET``): each target's
    MAE from its own run, throughput and epochs averaged; other rows unchanged."""
    out: list[dict[str, Any]] = []
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        base, _, target = r["model"].partition("@")
        if not target:
            out.append(r)
            continue
        key = (base, r["seed"])
        if key not in merged:
            merged[key] = {**r, "model": base, "result": {"per_target": {}, "parts": []}}
            out.append(merged[key])
        m = merged[key]["result"]
        if "per_target" not in r["result"]:
            m.pop("per_target", None)
            m["error"] = r["result"].get("error")
            continue
        m["parts"].append(r["result"])
        if "per_target" in m:
            m["per_target"].update(r["result"]["per_target"])
        for k in ("graphs_per_s", "epochs"):
            m[k] = sum(p[k] for p in m["parts"]) / len(m["parts"])
    return out


def write_report(res: dict[str, Any], results: Path) -> None:
    """crystal_encoders.md: mean and spread over seeds per dataset, pool, model and target."""
    import numpy as np

    lines = ["# Crystal encoders vs composition baselines (Materials Project)", "",
             f"`{res['command']}`; started {res['started']}; {res['machine']['nproc']} cores, "
             f"{res['jobs']} runs side by side (1 torch thread each); budget {res['minutes']} min per model; "
             f"seeds {res['seeds']}. MAE on the test split (log10 for moduli), mean +- half the range over seeds; "
             "graphs/s is training throughput (timing.json).", ""]
    for dataset in res["datasets"]:
        targets = TARGETS[dataset]
        for pool in res["pools"]:
            rows = merge_single([r for r in res["runs"] if r["dataset"] == dataset and r["pool"] == pool])
            if not rows:
                continue
            lines += [f"## {dataset}, {pool} training pool", "",
                      "| model | " + " | ".join(f"{t} MAE ({UNITS[t]})" for t in targets) + " | graphs/s | epochs | seeds |",
                      "|---" * (len(targets) + 4) + "|"]
            for model in dict.fromkeys(r["model"] for r in rows):
                ok = [r["result"] for r in rows if r["model"] == model and "per_target" in r["result"]]
                if not ok:
                    errs = [r["result"].get("error") for r in rows if r["model"] == model]
                    lines.append(f"| {model} | " + " | ".join("failed" for _ in targets) + f" | | | {errs[0]} |")
                    continue
                cells = []
                for t in targets:  # a *_single model whose run for t has not finished shows "-"
                    v = np.array([o["per_target"][t]["mae"] for o in ok if t in o["per_target"]])
                    cells.append(f"{v.mean():.4f} +- {(v.max() - v.min()) / 2:.4f}" if len(v) else "-")
                gps = [o.get("graphs_per_s") for o in ok if o.get("graphs_per_s")]
                eps = [o.get("epochs") for o in ok if o.get("epochs")]
                speed = f"{np.mean(gps):.0f}" if gps else "-"
                epochs = f"{np.mean(eps):.0f}" if eps else "-"
                diverged = sum(r["result"].get("error") == "diverged" for r in rows if r["model"] == model)
                seeds = f"{len(ok)}" + (f" (+{diverged} diverged)" if diverged else "")
                lines.append(f"| {model} | " + " | ".join(cells) + f" | {speed} | {epochs} | {seeds} |")
            lines.append("")
    if any("@" in r["model"] for r in res["runs"]):
        lines += ["`*_single`: one model per target, each trained on its own for the whole budget (its one-target "
                  "runs are listed below as MODEL@TARGET); two such runs side by side are the 2-core budget.", ""]
    lines += ["## Commands", ""] + [f"- {r['dataset']} {r['pool']} {r['model']} s{r['seed']}: `{r['result']['command']}`"
                                    for r in res["runs"] if "command" in r["result"]]
    (results / "crystal_encoders.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every model x pool x seed and write the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mp", required=True, help="shard directory of the full MP set (molmat preprocess)")
    p.add_argument("--elastic", help="shard directory of mp_elastic")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--pools", default="full,8k")
    p.add_argument("--models", default="mpnn,schnet,painn,both,schnet_plain," + ",".join(BASELINES))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", default="/tmp/molmat_crystal_bench")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--report-only", action="store_true", help="run nothing: report the finished runs under --work")
    p.add_argument("--only", choices=list(TARGETS), help="run and report one dataset only")
    args = p.parse_args(argv)
    datasets = {"mp": args.mp, **({"mp_elastic": args.elastic} if args.elastic else {})}
    if args.only:
        datasets = {args.only: datasets[args.only]}
    seeds = [int(s) for s in args.seeds.split(",")]
    pools, models = args.pools.split(","), args.models.split(",")
    for pool in pools:
        try:
            pool_size(pool)
        except ValueError as exc:
            p.error(str(exc))
    unknown = [m for m in models if base_model(m) not in MODELS and m not in BASELINES]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(list(MODELS) + list(BASELINES))}")
    jobs = [(d, s, j, pool, seed, args.minutes, args.work, args.report_only) for d, s in datasets.items() for pool in pools
            for seed in seeds for m in models if not (d == "mp_elastic" and pool != "full")
            for j in ([f"{m}@{t}" for t in TARGETS[d]] if m in SINGLE else [m])]
    res: dict[str, Any] = {"command": shlex.join([".venv/bin/python", "bench/bench_crystal.py", *(argv or sys.argv[1:])]),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minutes": args.minutes, "seeds": seeds,
                           "pools": pools, "datasets": list(datasets), "jobs": args.jobs,
                           "machine": {"nproc": os.cpu_count(), "platform": platform.platform()}, "runs": []}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool_ex:
        for (dataset, model, pool, seed), out in pool_ex.map(_job, jobs):
            if out.get("error") == "not run":
                continue
            res["runs"].append({"dataset": dataset, "model": model, "pool": pool, "seed": seed, "result": out})
            (results / "crystal_encoders.json").write_text(json.dumps(res, indent=1))
            write_report(res, results)
            log(f"{dataset} {pool} {model} s{seed}: " + json.dumps({t: v["mae"] for t, v in out.get("per_target", {}).items()}
                                                                  if "per_target" in out else out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
