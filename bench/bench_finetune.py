"""Issue 3 benchmark: molmat fine-tuning vs DGL-LifeSci's MPNNPredictor vs simple baselines.

Side by side on the same shards, the same seeded split (``split.json`` written by ``molmat
preprocess``), and the same wall-clock training budget per model (``--minutes``):

* QM9 (20,000 molecules; homo, lumo, gap): molmat MPNN, dgllife MPNNPredictor, Morgan
  fingerprint (radius 2, 2048 bits) ridge and MLP.
* MP (the first ``--mp-subset`` CIFs of the archive, in archive order; band gap, formation
  energy): molmat MPNN, molmat SchNet (cutoff 8), MPNNPredictor, composition ridge and MLP.
* mp_elastic (2,944 crystals; K_VRH, G_VRH learned and scored as log10): the same models.

plus a controlled speed comparison (molmat MPNN vs MPNNPredictor, same width, same pre-collated
QM9 batches of 64, forward + backward + clip + AdamW step, ``--speed-steps`` steps).

molmat runs through its command line (``molmat preprocess``, ``molmat finetune`` and
``molmat evaluate``, as ``python -m pipeline.cli``); the counters for graphs, validation and
checkpoint time come from the ``timing.json`` every training run writes (the trainer's
``TimingCallback``). MPNNPredictor is trained by this file
(``_dgllife`` subcommand, its own process) on molmat's own batches (``GraphBatch.g2d`` ndata
``x``, edata ``e``), so featurisation, split, batch size, loader and budget rule are identical.
dgllife is installed with ``pip install --no-deps --target /tmp/benchlib dgllife`` (plus
scikit-learn and threadpoolctl, which its import needs) and put on ``sys.path`` only here.

Usage::

    .venv/bin/python bench/bench_finetune.py --minutes 4            # the recorded run (~50 min)
    .venv/bin/python bench/bench_finetune.py --minutes 0.3 --results /tmp/smoke   # smoke run

Writes ``bench/results/finetune.json`` and ``finetune.md`` (and parity PNGs under
``bench/results/parity/``); scratch (shards, run dirs, logs) goes to ``--work``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from pipeline.graphs import GraphBatch

PY = str(ROOT / ".venv" / "bin" / "python")
MOLMAT = str(ROOT / ".venv" / "bin" / "molmat")
#: The molmat command line as a module (the console script calls the same `main`).
TIMED = "-m pipeline.cli"
BENCHLIB = "/tmp/benchlib"
DATA = Path("/work/shared/data")
HA_TO_EV = 27.211386
SEED = 0
BATCH = 64
LR = 1e-3
WEIGHT_DECAY = 1e-5     # molmat's default train.weight_decay
CLIP = 10.0             # molmat's default train.clip_grad
WARMUP = 100            # molmat's default train.warmup_steps
PATIENCE = 30           # molmat's default train.patience (epochs)
MAX_EPOCHS = 1000       # large: the budget stops every run

#: dataset -> what is learned and how it is reported
DATASETS: dict[str, dict[str, Any]] = {
    "qm9": {"targets": ["homo_Ha", "lumo_Ha", "gap_Ha"], "log10": [],
            "report": {"homo_Ha": ("homo", "eV", HA_TO_EV), "lumo_Ha": ("lumo", "eV", HA_TO_EV),
                       "gap_Ha": ("gap", "eV", HA_TO_EV)},
            "models": ["molmat_mpnn", "dgllife_mpnn", "morgan_ridge", "morgan_mlp"]},
    "mp": {"targets": ["band_gap_eV", "formation_energy_per_atom_eV"], "log10": [],
           "report": {"band_gap_eV": ("band_gap", "eV", 1.0),
                      "formation_energy_per_atom_eV": ("formation_energy", "eV/atom", 1.0)},
           "models": ["molmat_mpnn", "molmat_mpnn_plain", "molmat_schnet", "dgllife_mpnn", "composition_ridge",
                      "composition_mlp"]},
    "mp_elastic": {"targets": ["K_VRH_GPa", "G_VRH_GPa"], "log10": ["K_VRH_GPa", "G_VRH_GPa"],
                   "report": {"K_VRH_GPa": ("log10(K_VRH)", "log10(GPa)", 1.0),
                              "G_VRH_GPa": ("log10(G_VRH)", "log10(GPa)", 1.0)},
                   "models": ["molmat_mpnn", "molmat_mpnn_plain", "molmat_schnet", "dgllife_mpnn",
                              "composition_ridge", "composition_mlp"]},
}

COMMANDS: list[dict[str, Any]] = []


def log(msg: str) -> None:
    """Print ``msg`` with a time stamp, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------- processes
def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


#: Before each timed command, wait (at most this many seconds) until other processes use < QUIET_CORES.
QUIET_WAIT_S = 120.0
QUIET_CORES = 0.3
#: extra environment for every training/speed process (``--threads`` sets OMP_NUM_THREADS here)
RUN_ENV: dict[str, str] = {}


def wait_quiet(max_wait: float | None = None) -> tuple[float, float]:
    """Wait until the rest of the machine uses < QUIET_CORES cores over 3 s; returns (waited s, last reading)."""
    max_wait = QUIET_WAIT_S if max_wait is None else max_wait
    t0 = time.time()
    other = float("nan")
    while True:
        b0 = _busy_cpu_s()
        time.sleep(3.0)
        other = (_busy_cpu_s() - b0) / 3.0
        if other < QUIET_CORES or time.time() - t0 > max_wait:
            return time.time() - t0, other


def run_cmd(cmd: list[str], logfile: Path, what: str, env: dict[str, str] | None = None,
            record_as: str | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run a command from the repo root, output to ``logfile``; record it with timing and CPU load."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**RUN_ENV, **(env or {})}
    full_env = dict(os.environ)
    full_env.update(env)
    waited, before = wait_quiet() if quiet else (0.0, float("nan"))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0, load0 = _busy_cpu_s(), time.time(), os.getloadavg()
    with open(logfile, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    other = max(_busy_cpu_s() - busy0 - own, 0.0)
    env_txt = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    entry = {"what": what, "command": (env_txt + " " if env_txt else "") + shlex.join(cmd), "rc": rc,
             "wall_s": round(wall, 1), "cpu_cores_used": round(own / wall, 2) if wall else None,
             "other_processes_cores": round(other / wall, 2) if wall else None,
             "loadavg_start": [round(x, 2) for x in load0], "waited_for_quiet_s": round(waited, 1),
             "other_cores_before": round(before, 2) if math.isfinite(before) else None, "log": str(logfile)}
    if record_as:
        entry["equivalent"] = record_as
    COMMANDS.append(entry)
    if rc != 0:
        tail = logfile.read_text()[-3000:]
        log(f"FAILED ({rc}): {entry['command']}\n{tail}")
    return entry


# ----------------------------------------------------------------------------------- data
def prepare_mp_subset(work: Path, n: int) -> Path:
    """First ``n`` CIFs of mp/cifs.tar.gz (archive order) plus their labels.csv rows, in a directory."""
    from _subsets import subset_tar  # bench/ is the script's directory

    return subset_tar(DATA / "mp" / "cifs.tar.gz", work / "src" / f"mp_first{n}", n, ".cif", DATA / "mp" / "labels.csv")


def preprocess(name: str, work: Path, args: argparse.Namespace) -> Path:
    """Run ``molmat preprocess`` for one dataset; returns the shard directory."""
    d = work / "shards" / name
    targets = ",".join(DATASETS[name]["targets"])
    if name == "qm9":
        src = str(DATA / "qm9" / "qm9_20k.xyz.tar.bz2")
    elif name == "mp":
        src = str(DATA / "mp" / "cifs.tar.gz") if args.mp_subset <= 0 else str(prepare_mp_subset(work, args.mp_subset))
    else:
        src = str(DATA / "mp_elastic" / "cifs.tar.gz")
    cmd = [MOLMAT, "preprocess", src, "--out", str(d), "--targets", targets]
    e = run_cmd(cmd, work / "logs" / f"preprocess_{name}.log", f"preprocess {name}", quiet=False)
    if e["rc"] != 0:
        raise SystemExit(f"preprocess {name} failed; see {e['log']}")
    return d


def split_sizes(d: Path) -> dict[str, int]:
    """Record counts of the train/val/test splits in ``d/split.json``."""
    s = json.loads((d / "split.json").read_text())
    return {k: len(s[k]) for k in ("train", "val", "test")}


# ------------------------------------------------------------------------------ molmat runs
def molmat_model(name: str, model: str, d: Path, work: Path, minutes: float) -> dict[str, Any]:
    """``molmat finetune`` then ``molmat evaluate --split test``; returns per-target results."""
    spec = DATASETS[name]
    run = work / "runs" / f"{name}_{model}"
    if run.exists():
        shutil.rmtree(run)  # never resume from an older run's last.pt
    sets = [f"train.max_minutes={minutes}", f"train.epochs={MAX_EPOCHS}",
            "finetune.targets=[" + ",".join(spec["targets"]) + "]"]
    if model == "molmat_schnet":
        sets += ["model.encoder2d=null", "model.encoder3d.name=schnet", "model.encoder3d.cutoff=8.0"]
    if model == "molmat_mpnn_plain":
        sets += ["model.encoder2d.crystal_shells=false"]
    set_args = [a for s in sets for a in ("--set", s)]
    args = ["finetune", "--data", str(d), "--out", str(run)] + set_args
    e_ft = run_cmd([PY, *TIMED.split()] + args, work / "logs" / f"finetune_{name}_{model}.log", f"finetune {name} {model}",
                   record_as=shlex.join(["molmat"] + args))
    if e_ft["rc"] != 0:
        return {"error": f"finetune failed (rc {e_ft['rc']}), log {e_ft['log']}"}
    e_ev = run_cmd([MOLMAT, "evaluate", str(run), "--data", str(d), "--split", "test"],
                   work / "logs" / f"evaluate_{name}_{model}.log", f"evaluate {name} {model}", quiet=False)
    if e_ev["rc"] != 0:
        return {"error": f"evaluate failed (rc {e_ev['rc']}), log {e_ev['log']}"}
    metrics = json.loads((run / "eval_test" / "metrics.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    result = json.loads((run / "result.json").read_text())
    per_target = {}
    for t in spec["targets"]:
        m = metrics["targets"][t]
        per_target[t] = {"mae": m["log10"]["mae"] if t in spec["log10"] else m["mae"],
                         "mae_physical": m["mae"], "r2": m["log10"]["r2"] if t in spec["log10"] else m["r2"],
                         "count": m["count"]}
    return {"per_target": per_target, "graphs_per_s": timing["graphs_per_s"], "train_s": timing["train_s"],
            "eval_s": timing["eval_s"], "fit_s": timing["fit_s"], "graphs": timing["graphs"],
            "epochs": result["epochs_run"], "steps": result["steps"], "stopped_by": result["stopped_by"],
            "best_epoch": result["best_epoch"], "run_dir": str(run), "parity_dir": str(run / "eval_test"),
            "history": _molmat_history({"run_dir": str(run)}),
            "finetune_cmd": e_ft, "evaluate_cmd": e_ev}


def dgllife_model(name: str, d: Path, work: Path, minutes: float) -> dict[str, Any]:
    """MPNNPredictor in its own process (``_dgllife`` subcommand of this file)."""
    spec = DATASETS[name]
    run = work / "runs" / f"{name}_dgllife_mpnn"
    if run.exists():
        shutil.rmtree(run)
    cmd = [PY, "bench/bench_finetune.py", "_dgllife", "--data", str(d), "--out", str(run), "--minutes", str(minutes),
           "--targets", ",".join(spec["targets"])]
    if spec["log10"]:
        cmd += ["--log10", ",".join(spec["log10"])]
    e = run_cmd(cmd, work / "logs" / f"dgllife_{name}.log", f"dgllife {name}")
    if e["rc"] != 0:
        return {"error": f"dgllife failed (rc {e['rc']}), log {e['log']}"}
    res = json.loads((run / "result.json").read_text())
    res["cmd"] = e
    return res


# ------------------------------------------------------------------- dgllife MPNNPredictor
def _import_dgllife():
    if BENCHLIB not in sys.path:
        sys.path.append(BENCHLIB)  # appended: the project venv's packages win over anything there
    try:
        from dgllife.model import MPNNPredictor
        import dgllife
    except ImportError as exc:
        raise SystemExit(f"dgllife is not importable from {BENCHLIB} ({exc}); install it with\n"
                         f"  .venv/bin/pip install --no-deps --target {BENCHLIB} dgllife scikit-learn threadpoolctl")
    return MPNNPredictor, dgllife.__version__


def _datasets(d: Path, targets: list[str]):
    from finetune.modeldata import TargetColumns
    from pipeline.shards import ShardDataset, load_manifest
    from pipeline.splits import load_split

    manifest = load_manifest(d)
    split = load_split(d)
    names = [t["name"] for t in manifest["targets"]]
    cols = [names.index(t) for t in targets]
    return {k: TargetColumns(ShardDataset(d, split[k]), cols) for k in ("train", "val", "test")}


def _labels(ds) -> "np.ndarray":
    import numpy as np

    return np.stack([ds[i]["y"] for i in range(len(ds))]).astype(np.float64)


def _to_learned(y, is_log):
    """Physical (n, T) -> learned space (log10 for moduli) and validity mask (finite, >0 for log10)."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    mask = np.isfinite(y) & (~is_log | (y > 0))
    t = np.where(mask, y, 0.0)
    use_log = np.broadcast_to(is_log, y.shape) & mask
    t[use_log] = np.log10(y[use_log])
    return t, mask


def _scaled_val(pred_l, y_phys, is_log, std_l):
    """molmat's monitor: mean over targets of val MAE / spread (val std of y; train std of log10 y)."""
    import numpy as np

    t, mask = _to_learned(y_phys, is_log)
    out, per = [], []
    for j in range(t.shape[1]):
        m = mask[:, j]
        if is_log[j]:
            mae = float(np.abs(pred_l[m, j] - t[m, j]).mean()) if m.any() else float("nan")
            scale = float(std_l[j])
        else:
            mae = float(np.abs(pred_l[m, j] - t[m, j]).mean()) if m.any() else float("nan")
            scale = float(np.std(t[m, j])) if m.sum() > 1 else 1.0
        per.append(mae)
        if np.isfinite(mae):
            out.append(mae / max(scale, 1e-12))
    return float(np.mean(out)) if out else float("inf"), per


def _test_metrics(pred_l, y_phys, is_log, targets):
    """Per target: MAE in the learned space reported (log10 for moduli) and in physical units."""
    import numpy as np

    t, mask = _to_learned(y_phys, is_log)
    phys = np.where(is_log, 10.0 ** pred_l, pred_l)
    out = {}
    for j, name in enumerate(targets):
        m = mask[:, j]
        mp = np.isfinite(y_phys[:, j])
        err = pred_l[m, j] - t[m, j]
        ss = float(((t[m, j] - t[m, j].mean()) ** 2).sum())
        out[name] = {"mae": float(np.abs(err).mean()), "r2": float(1 - (err ** 2).sum() / ss) if ss > 0 else float("nan"),
                     "mae_physical": float(np.abs(phys[mp, j] - y_phys[mp, j]).mean()), "count": int(m.sum())}
    return out


def cmd_dgllife(args: argparse.Namespace) -> int:
    """Train MPNNPredictor on molmat batches with molmat's budget rule; write OUT/result.json."""
    import numpy as np
    import torch

    import pipeline  # noqa: F401
    from finetune.losses import masked_loss
    from pipeline.graphs import ATOM_DIM, BOND_DIM
    from pipeline.training import EpochSampler, make_loader, seed_everything

    MPNNPredictor, dgllife_version = _import_dgllife()
    targets = args.targets.split(",")
    is_log = np.array([t in (args.log10.split(",") if args.log10 else []) for t in targets])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(SEED)
    ds = _datasets(Path(args.data), targets)
    t_l, m_l = _to_learned(_labels(ds["train"]), is_log)
    mean = np.array([t_l[m_l[:, j], j].mean() for j in range(len(targets))])
    std = np.array([max(t_l[m_l[:, j], j].std(ddof=1), 1e-8) for j in range(len(targets))])
    y_val = _labels(ds["val"])
    y_test = _labels(ds["test"])
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    is_log_t = torch.tensor(is_log)

    model = MPNNPredictor(node_in_feats=ATOM_DIM, edge_in_feats=BOND_DIM, node_out_feats=64, edge_hidden_feats=64,
                          n_tasks=len(targets), num_step_message_passing=3, num_step_set2set=3, num_layer_set2set=1)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sampler = EpochSampler(len(ds["train"]), SEED)
    train_loader = make_loader(ds["train"], BATCH, sampler, 0)
    val_loader = make_loader(ds["val"], BATCH)
    test_loader = make_loader(ds["test"], 128)
    weight = torch.ones(len(targets))

    def normalise(batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's targets in the learned space (log10 for moduli), standardised, and their mask."""
        y, mask = batch.y.double(), batch.mask
        pos = y > 0
        t = torch.where(is_log_t, torch.log10(torch.where(pos, y, torch.ones_like(y))), y)
        mask = mask & (~is_log_t | pos)
        return ((t.float() - mean_t) / std_t), mask

    @torch.no_grad()
    def predict(loader: DataLoader) -> np.ndarray:
        """Predictions for all of ``loader`` in the learned space (de-standardised), float64."""
        model.eval()
        preds = []
        for b in loader:
            g = b.g2d
            preds.append((model(g, g.ndata["x"], g.edata["e"]) * std_t + mean_t).double().numpy())
        model.train()
        return np.concatenate(preds)

    budget = args.minutes * 60
    best, best_state, best_epoch, bad = math.inf, None, -1, 0
    graphs, steps, eval_s, epochs = 0, 0, 0.0, 0
    stopped_by = "epochs"
    history = []
    t_start = time.time()
    for epoch in range(MAX_EPOCHS):
        sampler.set_epoch(epoch)
        model.train()
        over = False
        for batch in train_loader:
            for g in opt.param_groups:  # molmat's linear warm-up (cosine over 1000 epochs is ~constant here)
                g["lr"] = LR * min(1.0, (steps + 1) / WARMUP)
            target, mask = normalise(batch)
            g2 = batch.g2d
            pred = model(g2, g2.ndata["x"], g2.edata["e"])
            loss = masked_loss(pred, target, mask, weight, "mse")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            graphs += batch.num_graphs
            steps += 1
            if time.time() - t_start > budget:
                over = True
                break
        t_ev = time.perf_counter()
        score, per = _scaled_val(predict(val_loader), y_val, is_log, std)
        eval_s += time.perf_counter() - t_ev
        epochs = epoch + 1
        history.append({"epoch": epoch, "step": steps, "val_mae_scaled": score, "seconds": round(time.time() - t_start, 2)})
        if score < best:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        print(f"epoch {epoch} step {steps} val_mae_scaled {score:.5g}{' (best)' if bad == 0 else ''}", flush=True)
        if over:
            stopped_by = "time_budget"
            break
        if bad >= PATIENCE:
            stopped_by = "early_stopping"
            break
    fit_s = time.time() - t_start
    model.load_state_dict(best_state)
    per_target = _test_metrics(predict(test_loader), y_test, is_log, targets)
    res = {"per_target": per_target, "graphs_per_s": graphs / (fit_s - eval_s), "train_s": fit_s - eval_s,
           "eval_s": eval_s, "fit_s": fit_s, "graphs": graphs, "epochs": epochs, "steps": steps,
           "stopped_by": stopped_by, "best_epoch": best_epoch, "best_val_mae_scaled": best, "params": n_params,
           "dgllife_version": dgllife_version, "torch_threads": torch.get_num_threads(), "history": history}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=1))
    return 0


# ------------------------------------------------------------------------------ baselines
def _features(ds, kind: str):
    import numpy as np

    rows = []
    if kind == "morgan":
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator

        RDLogger.DisableLog("rdApp.*")
        gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
        bad = 0
        for i in range(len(ds)):
            mol = Chem.MolFromSmiles(ds[i]["_smiles"])
            if mol is None:
                bad += 1
                rows.append(np.zeros(2048, dtype=np.float32))
            else:
                rows.append(gen.GetFingerprintAsNumPy(mol).astype(np.float32))
        return np.stack(rows), bad
    for i in range(len(ds)):  # composition: element fractions over Z = 1..94
        z = ds[i]["z"].astype(np.int64)
        v = np.bincount(np.clip(z, 0, 94), minlength=95)[1:95].astype(np.float32)
        rows.append(v / max(v.sum(), 1.0))
    return np.stack(rows), 0


def _ridge(X, Y, M, Xv, Yv_l, Mv, alphas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)):
    """Closed-form ridge per target (centred; no penalty on the intercept), alpha chosen on val MAE."""
    import numpy as np

    preds_val, coefs = [], []
    for j in range(Y.shape[1]):
        x, y = X[M[:, j]].astype(np.float64), Y[M[:, j], j]
        xm, ym = x.mean(0), y.mean()
        xc = x - xm
        gram, rhs = xc.T @ xc, xc.T @ (y - ym)
        best = None
        for a in alphas:
            w = np.linalg.solve(gram + a * np.eye(gram.shape[0]), rhs)
            pv = (Xv - xm) @ w + ym
            mae = float(np.abs(pv[Mv[:, j]] - Yv_l[Mv[:, j], j]).mean())
            if best is None or mae < best[0]:
                best = (mae, a, w, xm, ym)
        coefs.append(best)
    return coefs


def baseline(name: str, kind: str, model: str, d: Path, minutes: float) -> dict[str, Any]:
    """Ridge (closed form, alpha on val) or a 2x256 SiLU MLP (AdamW, batch 64, early stopping, same budget)."""
    import numpy as np
    import torch

    spec = DATASETS[name]
    targets = spec["targets"]
    is_log = np.array([t in spec["log10"] for t in targets])
    ds = _datasets(d, targets)
    t0 = time.time()
    X, bad = _features(ds["train"], kind)
    Xv, _ = _features(ds["val"], kind)
    Xt, _ = _features(ds["test"], kind)
    feat_s = time.time() - t0
    y_tr, y_va, y_te = _labels(ds["train"]), _labels(ds["val"]), _labels(ds["test"])
    T, M = _to_learned(y_tr, is_log)
    Tv, Mv = _to_learned(y_va, is_log)
    t1 = time.time()
    info: dict[str, Any] = {"features": kind, "feature_dim": int(X.shape[1]), "feature_s": round(feat_s, 1),
                            "unparsable_smiles": bad}
    if model == "ridge":
        coefs = _ridge(X, T, M, Xv, Tv, Mv)
        pred = np.stack([(Xt - xm) @ w + ym for (_, a, w, xm, ym) in coefs], axis=1)
        info["alphas"] = [c[1] for c in coefs]
        info.update(epochs=None, steps=None, stopped_by="closed_form", graphs_per_s=None)
    else:
        torch.manual_seed(SEED)
        mean = np.array([T[M[:, j], j].mean() for j in range(len(targets))])
        std = np.array([T[M[:, j], j].std() for j in range(len(targets))])
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                                  torch.nn.SiLU(), torch.nn.Linear(256, len(targets)))
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        Xtr_t = torch.from_numpy(X)
        Yn = torch.from_numpy(((T - mean) / std).astype(np.float32))
        Mt = torch.from_numpy(M)
        from finetune.losses import masked_loss

        w = torch.ones(len(targets))
        best, best_state, bad_ep, steps, seen, train_s, epoch = math.inf, None, 0, 0, 0, 0.0, 0
        start = time.time()
        stopped = "epochs"
        for epoch in range(MAX_EPOCHS):
            g = torch.Generator().manual_seed(SEED * 100003 + epoch)
            perm = torch.randperm(len(X), generator=g)
            te = time.time()
            over = False
            for k in range(0, len(X), BATCH):
                idx = perm[k:k + BATCH]
                loss = masked_loss(net(Xtr_t[idx]), Yn[idx], Mt[idx], w, "mse")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                seen += len(idx)
                if time.time() - start > minutes * 60:
                    over = True
                    break
            train_s += time.time() - te
            with torch.no_grad():
                pv = net(torch.from_numpy(Xv)).numpy() * std + mean
            score, _ = _scaled_val(pv, y_va, is_log, std)
            if score < best:
                best, bad_ep, best_state = score, 0, copy.deepcopy(net.state_dict())
            else:
                bad_ep += 1
            if over:
                stopped = "time_budget"
                break
            if bad_ep >= PATIENCE:
                stopped = "early_stopping"
                break
        net.load_state_dict(best_state)
        with torch.no_grad():
            pred = net(torch.from_numpy(Xt)).numpy() * std + mean
        info.update(epochs=epoch + 1, steps=steps, stopped_by=stopped, graphs_per_s=seen / train_s if train_s else None,
                    train_s=train_s)
    info["fit_s"] = round(time.time() - t1, 2)
    info["per_target"] = _test_metrics(pred, y_te, is_log, targets)
    return info


# --------------------------------------------------------------------- controlled speed test
def cmd_speed(args: argparse.Namespace) -> int:
    """molmat MPNN (PropertyModel, the finetune model) vs MPNNPredictor on identical pre-collated batches."""
    import numpy as np
    import torch

    import pipeline  # noqa: F401
    from pipeline.config import ModelConfig
    from pipeline.models.property import PropertyModel, TargetSpec
    from finetune.losses import masked_loss
    from pipeline.graphs import ATOM_DIM, BOND_DIM, collate
    from pipeline.models.mpnn import MPNNConfig
    from pipeline.training import EpochSampler, seed_everything

    MPNNPredictor, dgllife_version = _import_dgllife()
    targets = args.targets.split(",")
    ds = _datasets(Path(args.data), targets)["train"]
    order = EpochSampler(len(ds), SEED).order()
    n_batches = min(args.steps, len(order) // BATCH)
    warm = args.warmup
    batches = [collate([ds[i] for i in order[k * BATCH:(k + 1) * BATCH]]) for k in range(n_batches + warm)]
    ys = torch.cat([b.y for b in batches])
    mu, sd = ys.mean(0), ys.std(0).clamp_min(1e-8)
    atoms = float(np.mean([b.g2d.num_nodes() for b in batches]))
    edges = float(np.mean([b.g2d.num_edges() for b in batches]))
    w = torch.ones(len(targets))

    def make(kind: str) -> tuple[torch.nn.Module, Callable[[GraphBatch], torch.Tensor]]:
        """A freshly seeded model of ``kind`` and its forward function on a batch."""
        seed_everything(SEED)
        if kind == "dgllife":
            m = MPNNPredictor(ATOM_DIM, BOND_DIM, node_out_feats=64, edge_hidden_feats=64, n_tasks=len(targets),
                              num_step_message_passing=3, num_step_set2set=3, num_layer_set2set=1)
            fwd = lambda b: m(b.g2d, b.g2d.ndata["x"], b.g2d.edata["e"])  # noqa: E731
        else:
            m = PropertyModel(ModelConfig(encoder2d=MPNNConfig(hidden=64, steps=3, readout="set2set", set2set_iters=3)),
                              [TargetSpec(t, "") for t in targets])
            if kind == "molmat_per_edge":
                m.encoder2d.force_per_edge = True
            fwd = m
        return m, fwd

    def timed(kind: str) -> dict[str, float]:
        """Train a fresh ``kind`` model on the batches: graphs/s, wall s, CPU/wall and parameter count."""
        m, fwd = make(kind)
        opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        m.train()

        def step(b: GraphBatch) -> None:
            """One training step on ``b``: loss, backward, grad-norm clip, AdamW step."""
            loss = masked_loss(fwd(b), (b.y - mu) / sd, b.mask, w, "mse")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()

        for b in batches[:warm]:
            step(b)
        c0, t0 = time.process_time(), time.perf_counter()
        n = 0
        for b in batches[warm:]:
            step(b)
            n += b.num_graphs
        wall = time.perf_counter() - t0
        return {"graphs_per_s": n / wall, "wall_s": wall, "cpu_per_wall": (time.process_time() - c0) / wall,
                "params": sum(p.numel() for p in m.parameters())}

    kinds = ["molmat", "dgllife", "molmat_per_edge"]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for r in range(args.repeats):  # interleaved, so load from other processes hits all kinds alike
        for k in kinds:
            waited, other = wait_quiet(args.quiet_wait)
            runs[k].append(timed(k))
            runs[k][-1].update(waited_for_quiet_s=round(waited, 1), other_cores_before=round(other, 2))
            print(f"repeat {r} {k}: {runs[k][-1]['graphs_per_s']:.1f} graphs/s", flush=True)
    med = {k: float(np.median([x["graphs_per_s"] for x in v])) for k, v in runs.items()}
    res = {"data": args.data, "steps": n_batches, "warmup_steps": warm, "batch_size": BATCH, "repeats": args.repeats,
           "mean_atoms_per_batch": atoms, "mean_edges_per_batch": edges, "torch_threads": torch.get_num_threads(),
           "dgllife_version": dgllife_version, "runs": runs, "median_graphs_per_s": med,
           "ratio_molmat_over_dgllife": med["molmat"] / med["dgllife"],
           "ratio_molmat_per_edge_over_dgllife": med["molmat_per_edge"] / med["dgllife"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    return 0


def measure_loader(d: Path, targets: list[str], batches: int = 250) -> dict[str, Any]:
    """Where a training step's data time goes: molmat's own loader over the train split, no model.

    Returns ms per batch of 64 for the DataLoader (decode + collate), and us per record for
    ``ShardDataset`` pieces: the environment lookup (``_env``), ``raw`` (lookup + a read
    transaction + get), a bare LMDB get inside one transaction, and ``__getitem__`` (raw + decode).
    """
    import torch

    import pipeline  # noqa: F401
    from pipeline.shards import open_shard, record_key
    from pipeline.training import EpochSampler, make_loader

    ds = _datasets(d, targets)["train"]
    base = ds.base
    loader = make_loader(ds, BATCH, EpochSampler(len(ds), SEED), 0)
    per = []
    for _ in range(2):
        t, n = time.perf_counter(), 0
        for k, b in enumerate(loader):
            n += 1
            if n >= batches:
                break
        per.append((time.perf_counter() - t) / n * 1000)
    m = min(4000, len(base))

    def us(fn: Callable[[int], Any]) -> float:  # best of 3 passes over the same m records (pages warm after the first)
        """Microseconds per call of ``fn(i)`` over records ``0..m-1``."""
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for i in range(m):
                fn(i)
            best = min(best, (time.perf_counter() - t) / m * 1e6)
        return best

    env = open_shard(base.shards[0])
    with env.begin() as txn:
        bare = us(lambda i: txn.get(record_key(base.locate(int(base.indices[i]))[1])))
    return {"torch_threads": torch.get_num_threads(), "loader_ms_per_batch": min(per), "records_timed": m,
            "env_lookup_us": us(lambda i: base._env(0)), "raw_us": us(lambda i: base.raw(int(base.indices[i]))),
            "bare_lmdb_get_us": bare, "getitem_us": us(lambda i: base[i])}


# -------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    """Python, package and dgllife versions, git HEAD and uncommitted pipeline/finetune files."""
    out = {"python": platform.python_version()}
    code = ("import json,torch,dgl,rdkit,pymatgen.core,numpy,lmdb;"
            "print(json.dumps({'torch':torch.__version__,'dgl':dgl.__version__,'rdkit':rdkit.__version__,"
            "'pymatgen':pymatgen.core.__version__,'numpy':numpy.__version__,'lmdb':lmdb.__version__}))")
    try:
        out.update(json.loads(subprocess.check_output([PY, "-c", code], cwd=ROOT, text=True,
                                                      stderr=subprocess.DEVNULL).strip().splitlines()[-1]))
    except Exception as exc:  # noqa: BLE001
        out["error"] = str(exc)
    try:
        dist = next(Path(BENCHLIB).glob("dgllife-*.dist-info"))
        out["dgllife"] = dist.name.split("-")[1].replace(".dist", "")
    except StopIteration:
        out["dgllife"] = "missing"
    try:
        out["git_head"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "pipeline", "finetune"], cwd=ROOT,
                                        text=True).strip()
        out["pipeline_finetune_uncommitted"] = dirty.replace("\n", "; ") or "none"
    except Exception:  # noqa: BLE001
        pass
    return out


def machine() -> dict[str, Any]:
    """CPU count and model, memory (GiB) and platform of this machine."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform()}


def fmt(v: Any, nd: int = 4) -> str:
    """``v`` as table text: ``-`` for None, finite floats to ``nd`` significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}g}"
    return str(v)


MODEL_LABEL = {"molmat_mpnn": "molmat MPNN (edge network, d=64, T=3, set2set)",
               "molmat_mpnn_plain": "molmat MPNN, crystal edges without shells (model.encoder2d.crystal_shells=false)",
               "molmat_schnet": "molmat SchNet (cutoff 8 A)",
               "dgllife_mpnn": "dgllife MPNNPredictor (d=64, edge hidden 64, T=3, set2set 3x1)",
               "morgan_ridge": "Morgan r=2 2048 bits + ridge", "morgan_mlp": "Morgan r=2 2048 bits + MLP 2x256",
               "composition_ridge": "composition (Z 1..94 fractions) + ridge",
               "composition_mlp": "composition (Z 1..94 fractions) + MLP 2x256"}


def _molmat_history(r: dict[str, Any]) -> list[dict[str, float]]:
    """metrics.csv rows of a molmat run (from the result, or read from its run directory)."""
    if r.get("history"):
        return r["history"]
    path = Path(r.get("run_dir", "/nonexistent")) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_report(res: dict[str, Any], results_dir: Path) -> None:
    """Write ``res`` to ``finetune.json`` and render ``finetune.md`` in ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "finetune.json").write_text(json.dumps(res, indent=1, default=str))
    L: list[str] = ["# molmat fine-tuning benchmark (issue 3)", ""]
    L.append(f"- date: {res['date']} (finished {res.get('finished', 'not yet')})")
    m = res["machine"]
    L.append(f"- machine: nproc={m['nproc']}, CPU: {m['cpu']}, memory {m['memory_gib']} GiB, {m['platform']}; no GPU")
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    for u in res.get("updates", []):
        L.append(f"- re-run of some models on {u['date']}: `{u['command']}` (models: {u['models']}); their rows "
                 "and commands below come from that re-run")
    L.append(f"- threads: OMP_NUM_THREADS={res.get('threads')} for every trained model and the speed test "
             "(one thread per process keeps results comparable while the other developer's jobs use the second core; "
             "with 2 threads a step waits for a descheduled thread and throughput collapsed up to 30x in trials)")
    L.append(f"- budget: {res['minutes']} min of training wall time per model (molmat's rule for every trained "
             f"model: the clock starts when the training loop starts, validation counts against it, checked after "
             f"every step, then one last validation and the best-on-validation model is tested); batch {BATCH}, "
             f"AdamW lr {LR}, weight decay {WEIGHT_DECAY}, grad clip {CLIP}, {WARMUP}-step warm-up, early-stopping "
             f"patience {PATIENCE} epochs, train.epochs={MAX_EPOCHS}")
    L.append("- data: " + "; ".join(f"{k}: {v['n']} records, split train/val/test {v['split']['train']}/"
                                    f"{v['split']['val']}/{v['split']['test']} (seeded random, split.json of molmat "
                                    f"preprocess){' — ' + v['note'] if v.get('note') else ''}"
                                    for k, v in res["data"].items()))
    L.append("- **caveat: this machine has 2 CPU cores shared with another developer**; runs were sequential, but "
             "other processes used CPU during some runs (column 'other cores' below: CPU cores used by everything "
             "else during that run, from /proc/stat minus our own process). Throughput and MAE-at-fixed-budget both "
             "depend on that; treat small differences as noise.")
    L.append("")
    L.append("## Results (test split)")
    L.append("")
    L.append("| dataset | model | target | test MAE | unit | graphs/s (training) | epochs / steps | stopped by | "
             "budget | other cores |")
    L.append("|---|---|---|---:|---|---:|---|---|---|---:|")
    for ds, models in res["results"].items():
        rep = DATASETS[ds]["report"]
        for model, r in models.items():
            if "error" in r:
                L.append(f"| {ds} | {MODEL_LABEL.get(model, model)} | - | error | | | | {r['error']} | | |")
                continue
            other = (r.get("finetune_cmd") or r.get("cmd") or r).get("other_processes_cores")
            for t, v in r["per_target"].items():
                label, unit, factor = rep[t]
                es = f"{r.get('epochs') if r.get('epochs') is not None else '-'} / {r.get('steps') if r.get('steps') is not None else '-'}"
                gps = fmt(r.get("graphs_per_s"), 4)
                if model.endswith("_mlp"):
                    gps += " (samples/s)"
                L.append(f"| {ds} | {MODEL_LABEL.get(model, model)} | {label} | {v['mae'] * factor:.4g} | {unit} | "
                         f"{gps} | {es} | {r.get('stopped_by', '-')} | {res['minutes']} min | {fmt(other, 2)} |")
    L.append("")
    L.append("MAE in eV for QM9 (Hartree x 27.211386), eV and eV/atom for MP, and MAE of log10(GPa) for the elastic "
             "moduli (molmat: the 'log10' entry of evaluate's metrics.json; every model learns log10). graphs/s = "
             "graphs in training steps / (training-loop time minus validation and checkpoint writing), data loading "
             "and collation included. Ridge baselines are closed-form (alpha picked on val per target).")
    L.append("")
    # molmat vs dgllife
    L.append("## molmat vs MPNNPredictor at the same budget")
    L.append("")
    L.append("| dataset | target | molmat MPNN | MPNNPredictor | molmat lower? | best molmat encoder | best overall |")
    L.append("|---|---|---:|---:|---|---|---|")
    losses, beaten = [], []
    for ds, models in res["results"].items():
        rep = DATASETS[ds]["report"]
        a, b = models.get("molmat_mpnn", {}), models.get("dgllife_mpnn", {})
        if "per_target" not in a or "per_target" not in b:
            continue
        for t in DATASETS[ds]["targets"]:
            label, unit, f = rep[t]
            va, vb = a["per_target"][t]["mae"] * f, b["per_target"][t]["mae"] * f
            mol = {k: v["per_target"][t]["mae"] * f for k, v in models.items() if k.startswith("molmat") and "per_target" in v}
            allm = {k: v["per_target"][t]["mae"] * f for k, v in models.items() if "per_target" in v}
            bm = min(mol, key=mol.get)
            ba = min(allm, key=allm.get)
            win = va < vb
            if not win:
                losses.append(f"{ds} {label}")
            if not ba.startswith("molmat"):
                beaten.append(f"{ds} {label}: {MODEL_LABEL.get(ba, ba)} {allm[ba]:.4g} {unit} vs best molmat "
                              f"({bm}) {mol[bm]:.4g} {unit}")
            L.append(f"| {ds} | {label} | {va:.4g} {unit} | {vb:.4g} {unit} | {'yes' if win else '**NO**'} | "
                     f"{bm} ({mol[bm]:.4g}) | {ba} ({allm[ba]:.4g}) |")
    L.append("")
    if losses:
        L.append("**molmat's MPNN does NOT beat MPNNPredictor in test MAE within the same budget on: "
                 + ", ".join(losses) + ".**")
    elif res["results"]:
        L.append("molmat's MPNN has the lower test MAE than MPNNPredictor on every target compared.")
    L.append("")
    if beaten:
        L.append("**Where a simple baseline beats every molmat encoder within the same budget:** " + "; ".join(beaten) + ".")
        L.append("")
    # equal-epoch view: is the difference speed, or learning per epoch?
    eq_rows, eq_dgl_better, eq_total = [], [], 0
    for ds, models in res["results"].items():
        a, b = models.get("molmat_mpnn", {}), models.get("dgllife_mpnn", {})
        ha, hb = _molmat_history(a), b.get("history") or []
        for h in hb:
            match = [x for x in ha if int(x["epoch"]) == h["epoch"]]
            if not match:
                continue
            x = match[0]
            full = int(x["step"]) == int(h["step"])
            eq_total += 1
            if h["val_mae_scaled"] < x["val_mae_scaled"]:
                eq_dgl_better.append(f"{ds} epoch {h['epoch'] + 1}")
            eq_rows.append(f"| {ds} | {h['epoch'] + 1} | {int(x['step'])} | {x['val_mae_scaled']:.4f} | {x['seconds']:.0f} | "
                           f"{h['step']}{'' if full else ' (epoch cut by the budget)'} | {h['val_mae_scaled']:.4f} | "
                           f"{h['seconds']:.0f} |")
    if eq_rows:
        L.append("### Same number of epochs (validation, molmat's monitor `val_mae_scaled`, lower is better)")
        L.append("")
        L.append("Where the budget win comes from: the table compares both models after the same epochs (same "
                 "batches in the same order), from molmat's metrics.csv and the MPNNPredictor run's history.")
        L.append("")
        L.append("| dataset | epochs | molmat steps | molmat val_mae_scaled | molmat s | MPNNPredictor steps | "
                 "MPNNPredictor val_mae_scaled | MPNNPredictor s |")
        L.append("|---|---:|---:|---:|---:|---|---:|---:|")
        L += eq_rows
        L.append("")
        L.append(f"At an equal number of epochs MPNNPredictor's validation error is lower in {len(eq_dgl_better)} of "
                 f"{eq_total} comparable epochs ({', '.join(eq_dgl_better) or 'none'}); the two learn about equally "
                 "per epoch, so molmat's lower test MAE at a fixed budget comes from doing many more epochs in the same "
                 "time, not from learning more per epoch.")
        L.append("")
    sp = res.get("speed")
    if sp:
        L.append("## Controlled speed comparison (issue target: molmat >= 1.5x MPNNPredictor)")
        L.append("")
        L.append(f"Same pre-collated QM9 training batches ({sp['batch_size']} graphs, mean {sp['mean_atoms_per_batch']:.0f} "
                 f"atoms and {sp['mean_edges_per_batch']:.0f} directed bond edges per batch), {sp['steps']} timed steps "
                 f"after {sp['warmup_steps']} warm-up steps, forward + MSE loss + backward + grad-norm clip + AdamW step, "
                 f"{sp['torch_threads']} torch threads, median of {sp['repeats']} interleaved repeats. molmat = the "
                 f"PropertyModel that `molmat finetune` trains (MPNN d=64, T=3, set2set 3, one 2x128 head per target); "
                 f"MPNNPredictor(node_out_feats=64, edge_hidden_feats=64, T=3, set2set 3 iters x 1 layer, n_tasks=3).")
        L.append("")
        L.append("| model | graphs/s (median) | all repeats | CPU/wall | params |")
        L.append("|---|---:|---|---:|---:|")
        for k, v in sp["runs"].items():
            reps = ", ".join("%.0f" % x["graphs_per_s"] for x in v)
            cpu = sum(x["cpu_per_wall"] for x in v) / len(v)
            L.append(f"| {k} | {sp['median_graphs_per_s'][k]:.0f} | {reps} | {cpu:.2f} | {v[0]['params']} |")
        ratio = sp["ratio_molmat_over_dgllife"]
        L.append("")
        L.append(f"Ratio molmat / MPNNPredictor: **{ratio:.2f}x** -> **{'PASS' if ratio >= 1.5 else 'FAIL'}** "
                 f"(target >= 1.5x). molmat with `force_per_edge=True` (the textbook per-edge matrices, as NNConv "
                 f"does): {sp['ratio_molmat_per_edge_over_dgllife']:.2f}x.")
        L.append("")
        if res.get("speed_mp"):
            s2 = res["speed_mp"]
            L.append(f"Same comparison on MP crystal graphs (first {s2['steps']} train batches, mean "
                     f"{s2['mean_atoms_per_batch']:.0f} atoms and {s2['mean_edges_per_batch']:.0f} neighbour edges per "
                     f"batch): molmat {s2['median_graphs_per_s']['molmat']:.0f}, MPNNPredictor "
                     f"{s2['median_graphs_per_s']['dgllife']:.0f}, molmat per-edge "
                     f"{s2['median_graphs_per_s']['molmat_per_edge']:.0f} graphs/s; ratio "
                     f"**{s2['ratio_molmat_over_dgllife']:.2f}x**.")
            L.append("")
    for label, x in res.get("extra_speed", {}).items():
        L.append(f"### Earlier speed measurement: {label}")
        L.append("")
        L.append(f"From `{x['file']}` ({x['steps']} steps of batch {x['batch_size']}, {x['torch_threads']} torch threads, "
                 f"{x['repeats']} repeats; every repeat listed with the CPU cores other processes used just before it).")
        L.append("")
        L.append("| model | graphs/s (median) | repeats: graphs/s (CPU/wall, other cores before) |")
        L.append("|---|---:|---|")
        for k, v in x["runs"].items():
            reps = ", ".join("%.0f (%.2f, %s)" % (r["graphs_per_s"], r["cpu_per_wall"], r.get("other_cores_before"))
                             for r in v)
            L.append(f"| {k} | {x['median_graphs_per_s'][k]:.0f} | {reps} |")
        L.append("")
        L.append(f"Ratio molmat / MPNNPredictor: {x['ratio_molmat_over_dgllife']:.2f}x "
                 f"(per-edge molmat: {x['ratio_molmat_per_edge_over_dgllife']:.2f}x).")
        L.append("")
    lo = res.get("loader")
    if lo and sp:
        step_ms = 1000 * BATCH / sp["median_graphs_per_s"]["molmat"]
        L.append("## Where molmat's training time goes (QM9, 1 thread)")
        L.append("")
        L.append(f"- model step (forward, backward, clip, AdamW) on pre-collated batches: {step_ms:.1f} ms per batch of "
                 f"{BATCH} (controlled test above)")
        L.append(f"- data (molmat's DataLoader in the main process: LMDB read + decode + collate): "
                 f"{lo['loader_ms_per_batch']:.1f} ms per batch, i.e. {100 * lo['loader_ms_per_batch'] / (step_ms + lo['loader_ms_per_batch']):.0f}% "
                 f"of a training step (train.num_workers=0 by default, so nothing overlaps)")
        L.append(f"- per record: ShardDataset.__getitem__ {lo['getitem_us']:.0f} us, of which `_env` (a `Path.exists()` "
                 f"stat plus `Path.resolve()` inside `open_shard`, every record) {lo['env_lookup_us']:.0f} us and "
                 f"`raw` (that plus one read transaction per record) {lo['raw_us']:.0f} us, against "
                 f"{lo['bare_lmdb_get_us']:.1f} us for locate + a bare LMDB get inside one open transaction (best of 3 "
                 f"passes over {lo.get('records_timed', '?')} train records)")
        L.append("- MPNNPredictor's step is slow because DGL's NNConv materialises one d x d matrix per edge (E x 64 x 64 "
                 "floats: ~39 MB per QM9 batch, ~245 MB per MP batch) and multiplies edge by edge; molmat evaluates the "
                 "edge network once per distinct edge-feature row (11 distinct rows in QM9, 1 for crystal "
                 "neighbour edges) and does one (N, U*d) matmul plus one sparse sum (`force_per_edge=True` row above "
                 "shows the per-edge form).")
        L.append("")
    if res.get("parity"):
        L.append("## Parity plots (molmat evaluate, test split)")
        L.append("")
        for p in res["parity"]:
            L.append(f"- [{p}]({p})")
        L.append("")
    L.append("## Commands (cwd /work/main)")
    L.append("")
    L.append(f"Whole benchmark: `{res['command']}`")
    L.append("")
    L.append("`python -m pipeline.cli ARGS` is `molmat ARGS` (the console script's entry point); counters for graphs, "
             "validation and checkpoint time come from each run's `timing.json`; the `molmat ...` form is shown "
             "as well.")
    L.append("")
    L.append("| what | command | wall s | our cores | other cores | waited for quiet s |")
    L.append("|---|---|---:|---:|---:|---:|")
    for c in res["commands"]:
        cmd = c["command"].replace(str(ROOT) + "/", "")
        if c.get("equivalent"):
            cmd += f"` (= `{c['equivalent']}`)"
            cmd = "`" + cmd
        else:
            cmd = f"`{cmd}`"
        cmd = cmd.replace("|", "\\|")
        L.append(f"| {c['what']} | {cmd} | {c['wall_s']} | {fmt(c['cpu_cores_used'], 2)} | "
                 f"{fmt(c['other_processes_cores'], 2)} | {c.get('waited_for_quiet_s', '-')} |")
    L.append("")
    L.append("dgllife install (outside the project venv): `.venv/bin/pip install --no-deps --target /tmp/benchlib dgllife`, "
             "then, because `import dgllife.model` imports `dgllife.utils` which needs scikit-learn, "
             "`.venv/bin/pip install --no-deps --target /tmp/benchlib scikit-learn` and "
             "`... threadpoolctl` (scipy and joblib come from the venv).")
    (results_dir / "finetune.md").write_text("\n".join(L) + "\n")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or an internal ``_dgllife``/``_speed`` subcommand); returns the exit status."""
    global QUIET_WAIT_S
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="sub")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per model (minutes)")
    p.add_argument("--work", default="/tmp/molmat_bench", help="scratch: shards, run dirs, logs")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where finetune.json/.md go")
    p.add_argument("--mp-subset", type=int, default=10000, help="first N CIFs of mp/cifs.tar.gz (0 = all)")
    p.add_argument("--datasets", default="qm9,mp,mp_elastic")
    p.add_argument("--speed-steps", type=int, default=200)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                   help="before each timed run wait at most this long for other processes to go quiet (s)")
    p.add_argument("--extra-speed", action="append", default=[], metavar="LABEL=FILE",
                   help="also report an earlier _speed result (e.g. one taken with other thread settings)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS for every training/speed process and torch threads of in-process "
                        "baselines (0 = torch's default)")
    p.add_argument("--models", default="", help="run only these models (comma-separated keys, e.g. morgan_mlp)")
    p.add_argument("--update", action="store_true",
                   help="load RESULTS/finetune.json and replace only the models run now (keeps the rest)")
    p.add_argument("--no-speed", action="store_true", help="skip the controlled speed comparisons")
    p.add_argument("--report-only", action="store_true", help="rewrite finetune.md from RESULTS/finetune.json")
    p.add_argument("--measure-loader", action="store_true",
                   help="with --report-only: also (re)measure the data-loading breakdown on the QM9 shards")
    d = sub.add_parser("_dgllife", help="internal: train MPNNPredictor on one shard dir")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--minutes", type=float, required=True)
    d.add_argument("--targets", required=True)
    d.add_argument("--log10", default="")
    s = sub.add_parser("_speed", help="internal: controlled speed comparison")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--targets", required=True)
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--quiet-wait", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.sub == "_dgllife":
        return cmd_dgllife(args)
    if args.sub == "_speed":
        return cmd_speed(args)

    if args.report_only:
        res = json.loads((Path(args.results) / "finetune.json").read_text())
        for models in res["results"].values():  # keep the validation histories in the JSON too
            for r in models.values():
                if "run_dir" in r and not r.get("history"):
                    r["history"] = _molmat_history(r)
        if args.measure_loader:
            import torch

            torch.set_num_threads(args.threads or 1)
            res["loader"] = measure_loader(Path(res["data"]["qm9"]["dir"]), DATASETS["qm9"]["targets"])
        write_report(res, Path(args.results))
        return 0
    _import_dgllife()  # fail early with the install line
    if args.threads:
        import torch

        RUN_ENV["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # the baselines train in this process
    only = {m for m in args.models.split(",") if m}
    QUIET_WAIT_S = args.quiet_wait
    work, results_dir = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": shlex.join([".venv/bin/python", "bench/bench_finetune.py"] + (argv or sys.argv[1:])),
                           "minutes": args.minutes, "machine": machine(), "versions": versions(), "data": {},
                           "results": {}, "commands": COMMANDS, "work": str(work)}
    res["machine"]["loadavg_start"] = os.getloadavg()
    res["threads"] = args.threads or "torch default (OMP_NUM_THREADS unset)"
    old = None
    if args.update:
        old = json.loads((results_dir / "finetune.json").read_text())
        COMMANDS[:0] = old["commands"]
        upd = old.get("updates", []) + [{"date": res["date"], "command": res["command"],
                                          "models": sorted(only) or "all"}]
        res = {**old, "commands": COMMANDS, "updates": upd}
        res.pop("finished", None)
    res["extra_speed"] = res.get("extra_speed") or {}
    for item in args.extra_speed:
        label, _, path = item.partition("=")
        res["extra_speed"][label] = json.loads(Path(path).read_text())
        res["extra_speed"][label]["file"] = path
    names = [n for n in args.datasets.split(",") if n]
    shard_dirs = {}
    for name in names:
        log(f"preprocess {name}")
        shard_dirs[name] = preprocess(name, work, args)
        man = json.loads((shard_dirs[name] / "manifest.json").read_text())
        note = ""
        if name == "mp" and args.mp_subset > 0:
            note = (work / "src" / f"mp_first{args.mp_subset}" / "SUBSET.txt").read_text().strip()
        res["data"][name] = {"dir": str(shard_dirs[name]), "n": man["records"], "rejected": man["rejected"],
                             "split": split_sizes(shard_dirs[name]), "note": note}
    write_report(res, results_dir)

    if "qm9" in names and not args.no_speed:  # controlled speed comparison first
        log("controlled speed comparison on QM9")
        out = work / "speed_qm9.json"
        e = run_cmd([PY, "bench/bench_finetune.py", "_speed", "--data", str(shard_dirs["qm9"]), "--out", str(out),
                     "--targets", ",".join(DATASETS["qm9"]["targets"]), "--steps", str(args.speed_steps),
                     "--repeats", str(args.speed_repeats), "--quiet-wait", str(args.quiet_wait)],
                    work / "logs" / "speed_qm9.log", "speed qm9")
        if e["rc"] == 0:
            res["speed"] = json.loads(out.read_text())
            res["speed"]["cmd"] = e
    if "mp" in names and not args.no_speed:
        log("speed comparison on MP crystal graphs")
        out = work / "speed_mp.json"
        e = run_cmd([PY, "bench/bench_finetune.py", "_speed", "--data", str(shard_dirs["mp"]), "--out", str(out),
                     "--targets", ",".join(DATASETS["mp"]["targets"]), "--steps", str(max(args.speed_steps // 20, 3)),
                     "--warmup", "2", "--repeats", "1", "--quiet-wait", str(args.quiet_wait)],
                    work / "logs" / "speed_mp.log", "speed mp")
        if e["rc"] == 0:
            res["speed_mp"] = json.loads(out.read_text())
            res["speed_mp"]["cmd"] = e
    write_report(res, results_dir)

    for name in names:
        res["results"].setdefault(name, {})
        for model in DATASETS[name]["models"]:
            if only and model not in only:
                continue
            log(f"{name}: {model} ({args.minutes} min)")
            if model.startswith("molmat"):
                r = molmat_model(name, model, shard_dirs[name], work, args.minutes)
            elif model == "dgllife_mpnn":
                r = dgllife_model(name, shard_dirs[name], work, args.minutes)
            else:
                if args.no_baselines:
                    continue
                kind, how = model.split("_")
                waited, before = wait_quiet()
                t0, b0 = time.time(), _busy_cpu_s()
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                try:
                    r = baseline(name, kind, how, shard_dirs[name], args.minutes)
                except Exception as exc:  # noqa: BLE001
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                wall = time.time() - t0
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                r["wall_s"] = round(wall, 1)
                r["torch_threads"] = __import__("torch").get_num_threads()
                r["cpu_cores_used"] = round(own / wall, 2)
                r["other_processes_cores"] = round(max(_busy_cpu_s() - b0 - own, 0.0) / wall, 2)
                r["waited_for_quiet_s"] = round(waited, 1)
            res["results"][name][model] = r
            if "per_target" in r:
                log("  " + ", ".join(f"{t}: {v['mae']:.4g}" for t, v in r["per_target"].items())
                    + f"; {fmt(r.get('graphs_per_s'))} graphs/s, {r.get('epochs')} epochs")
            else:
                log(f"  {r.get('error')}")
            write_report(res, results_dir)

    # parity plots of molmat evaluate (copied while the total stays < 2 MB); with --update the plots
    # of models not re-run stay (their run directories are gone), those of re-run models are replaced
    pdir = results_dir / "parity"
    fresh = {(name, model) for name in res["results"] for model, r in res["results"][name].items()
             if "parity_dir" in r and Path(r["parity_dir"]).is_dir()}
    if pdir.exists() and not args.update:
        shutil.rmtree(pdir)
    pdir.mkdir(parents=True, exist_ok=True)
    for png in pdir.glob("*.png"):
        if any(png.name.startswith(f"{name}_{model}_parity_") for name, model in fresh):
            png.unlink()
    kept = sorted(pdir.glob("*.png"))
    total, copied = sum(p.stat().st_size for p in kept), [str(p.relative_to(results_dir)) for p in kept]
    for name in res["results"]:
        for model, r in res["results"][name].items():
            if (name, model) not in fresh:
                continue
            for png in sorted(Path(r["parity_dir"]).glob("parity_*.png")):
                size = png.stat().st_size
                if total + size > 1.8 * 2**20:
                    continue
                dst = pdir / f"{name}_{model}_{png.name}"
                shutil.copy(png, dst)
                total += size
                copied.append(str(dst.relative_to(results_dir)))
    res["parity"] = copied
    if "qm9" in shard_dirs and not args.no_speed:
        res["loader"] = measure_loader(shard_dirs["qm9"], DATASETS["qm9"]["targets"])
    res["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    res["machine"]["loadavg_end"] = os.getloadavg()
    write_report(res, results_dir)
    log(f"wrote {results_dir / 'finetune.json'} and {results_dir / 'finetune.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
