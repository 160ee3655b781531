"""3D Infomax benchmark (Stärk et al. 2022) with molmat's command line: pretrained vs scratch.

What it measures: does contrastive 2D-3D pretraining (``molmat pretrain``) of the 2D MPNN make
fine-tuning (``molmat finetune --init ENC``) more accurate than the same fine-tuning from a random
initialisation, with everything else identical (data, split, subset, seed, epochs, optimiser)?
Every number is a test-split MAE from ``molmat evaluate RUN --split test``; the model evaluated is
the one molmat selected on the validation split, so the test split is never used for selection.

Cases
1. QM9 (20k molecules, ``qm9/qm9_20k.xyz.tar.bz2``, random 80/10/10 split, seed 0, written by
   ``molmat preprocess``; no extra ETKDG conformers). Pretraining on the train split (no labels);
   fine-tuning on the 8 targets mu, alpha, homo, lumo, gap, r2, zpve, Cv with
   ``finetune.max_train`` = each of ``--sizes`` labelled molecules.
2. QM8 from SMILES only (``preprocess.molecule.embed_smiles=false``: no geometry at all), CC2
   targets E1, E2, f1, f2, fine-tuned from the QM9 encoder vs scratch (transfer case), with
   ``finetune.max_train`` = each of ``--qm8-sizes``.
3. Crystals: the first ``--mp-subset`` CIFs of ``mp/cifs.tar.gz`` (archive order) with their
   ``labels.csv`` rows (band_gap_eV) and the whole ``mp_elastic`` set (K_VRH_GPa, G_VRH_GPa,
   learned and scored as log10). The crystal encoder is pretrained on the MP subset's train split
   (neighbour-topology MPNN vs periodic SchNet, ``pretrain.encoder3d.cutoff=8.0``), then the band gap is
   fine-tuned on the MP subset and the moduli on mp_elastic, scratch vs ``--init``.

Budgets are fixed epoch counts (``train.epochs``), never wall-clock (``train.max_minutes`` unset,
``train.patience=100000``), so the comparison is fair on a loaded machine. Every molmat command
runs as ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 molmat ...`` (one training at a time; one
intra-op thread: on a busy 2-core machine torch's default two spinning OpenMP threads were ~30x
slower for the same result).

Usage (from the repository root)::

    nohup nice -n 19 .venv/bin/python bench/bench_infomax.py > /tmp/infomax/log.txt 2>&1 &   # recorded run
    .venv/bin/python bench/bench_infomax.py --workdir /tmp/infomax/smoke --results /tmp/infomax/smoke/res \\
        --sizes 200 --qm8-sizes 200 --seeds 1 --epochs 1 --pretrain-epochs 1 --mp-epochs 1 --elastic-epochs 1 \\
        --qm9-subset 1500 --qm8-subset 1500 --mp-subset 800 --elastic-subset 600               # smoke run

Flags: ``--seeds`` (fine-tuning seeds 0..N-1, default 3), ``--sizes`` (QM9 label counts, default
1000,5000), ``--epochs`` (fine-tuning epochs per size: one int, or a comma list matched to
``--sizes``), ``--pretrain-epochs``, ``--only {qm9,qm8,mp}`` (repeatable; qm8 needs the QM9
encoder, which is made if missing), ``--workdir`` (shards, encoders, runs, logs; default
/tmp/infomax/W). Finished runs (``eval_test/metrics.json`` present, same command) are reused, so
the script can be re-run after an interruption. Results are written after every run to
``bench/results/infomax.json`` and ``bench/results/infomax.md``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOLMAT = str(ROOT / ".venv" / "bin" / "molmat")
PY = str(ROOT / ".venv" / "bin" / "python")
DATA = Path("/work/shared/data")
HA_TO_EV = 27.211386
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREFIX = ["nice", "-n", "19"]
PATIENCE = 100000  # no early stopping: every run trains for exactly its epoch budget

QM9_TARGETS = ["mu_D", "alpha_bohr3", "homo_Ha", "lumo_Ha", "gap_Ha", "r2_bohr2", "zpve_Ha", "Cv_calmolK"]
QM8_TARGETS = ["E1-CC2", "E2-CC2", "f1-CC2", "f2-CC2"]
MP_TARGETS = ["band_gap_eV"]
EL_TARGETS = ["K_VRH_GPa", "G_VRH_GPa"]

STATE: dict[str, Any] = {"commands": [], "cases": {}, "pretrain": {}, "notes": [], "data": {}}
ARGS: argparse.Namespace
T0 = time.time()


def log(msg: str) -> None:
    """Print ``msg`` with the time of day and minutes since start, flushed."""
    print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - T0) / 60:5.1f} min] {msg}", flush=True)


# ------------------------------------------------------------------------------------ commands
def run_cmd(args: list[str], logfile: Path, what: str) -> dict[str, Any]:
    """Run ``nice -n 19 molmat ARGS`` with one OpenMP thread from the repo root; record it."""
    cmd = PREFIX + [MOLMAT] + args
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ENV)
    t0, load0 = time.time(), os.getloadavg()
    with open(logfile, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    entry = {"what": what, "command": " ".join(f"{k}={v}" for k, v in ENV.items()) + " " + shlex.join(cmd),
             "rc": rc, "wall_s": round(time.time() - t0, 1), "loadavg_start": [round(x, 2) for x in load0],
             "log": str(logfile)}
    STATE["commands"].append(entry)
    if rc != 0:
        log(f"FAILED ({rc}): {entry['command']}\n{logfile.read_text()[-3000:]}")
        raise SystemExit(f"{what} failed (rc {rc}); see {logfile}")
    log(f"done in {entry['wall_s']:.0f} s: {what}")
    return entry


def reuse_note(what: str, cmd_args: list[str]) -> None:
    """Record a command whose earlier output is reused instead of running it again."""
    STATE["commands"].append({"what": what, "command": " ".join(f"{k}={v}" for k, v in ENV.items()) + " "
                              + shlex.join(PREFIX + [MOLMAT] + cmd_args), "rc": 0, "reused": True})


def _marker_ok(d: Path, cmd_args: list[str]) -> bool:
    m = d / "BENCH_COMMAND.txt"
    return m.exists() and m.read_text() == shlex.join(cmd_args)


def _mark(d: Path, cmd_args: list[str]) -> None:
    (d / "BENCH_COMMAND.txt").write_text(shlex.join(cmd_args))


# ---------------------------------------------------------------------------------------- data
from _subsets import subset_tar  # noqa: E402  (bench/ is the script's directory)


def subset_csv(src: Path, out: Path, n: int) -> Path:
    """The header and first ``n`` rows of a CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(src) as fh, open(out, "w") as fo:
        for i, line in enumerate(fh):
            if i > n:
                break
            fo.write(line)
    return out


def preprocess(name: str, sources: list[str], targets: list[str] | None, sets: list[str]) -> Path:
    """``molmat preprocess`` into WORKDIR/``name`` unless done; records the data, returns the shard dir."""
    d = ARGS.workdir / name
    a = ["preprocess", *sources, "--out", str(d)]
    if targets:
        a += ["--targets", ",".join(targets)]
    for s in sets:
        a += ["--set", s]
    if (d / "manifest.json").exists() and _marker_ok(d, a):
        reuse_note(f"preprocess {name}", a)
    else:
        if d.exists():
            shutil.rmtree(d)
        run_cmd(a, ARGS.workdir / "logs" / f"preprocess_{name}.log", f"preprocess {name}")
        _mark(d, a)
    manifest = json.loads((d / "manifest.json").read_text())
    split = json.loads((d / "split.json").read_text())
    stats = json.loads((d / "stats.json").read_text())
    STATE["data"][name] = {"dir": str(d), "records": manifest["records"], "rejected": manifest["rejected"],
                           "split": {k: len(split[k]) for k in ("train", "val", "test")},
                           "split_method": split.get("method"), "split_seed": split.get("seed"),
                           "targets": manifest["targets"],
                           "atoms_per_graph": stats["per_graph"]["atoms"]["mean"],
                           "sources": sources}
    return d


def pretrain(name: str, data: Path, sets: list[str]) -> Path:
    """``molmat pretrain`` of encoder ``name`` unless done; records its metrics, returns the encoder dir."""
    enc = ARGS.workdir / f"enc_{name}"
    a = ["pretrain", "--data", str(data), "--out", str(enc), "--set", f"train.epochs={ARGS.pretrain_epochs}",
         "--set", f"train.patience={PATIENCE}"]
    for s in sets:
        a += ["--set", s]
    if (enc / "result.json").exists() and _marker_ok(enc, a):
        reuse_note(f"pretrain {name}", a)
    else:
        if enc.exists():
            shutil.rmtree(enc)
        enc.mkdir(parents=True)
        _mark(enc, a)  # resume from last.pt only with this very command
        log(f"pretraining {name} encoder ({ARGS.pretrain_epochs} epochs)")
        run_cmd(a, ARGS.workdir / "logs" / f"pretrain_{name}.log", f"pretrain {name}")
    rows = list(csv.DictReader(open(enc / "metrics.csv")))
    result = json.loads((enc / "result.json").read_text())
    STATE["pretrain"][name] = {"dir": str(enc), "data": str(data), "result": result,
                               "epochs": [{k: _num(v) for k, v in r.items()} for r in rows]}
    write_results()
    return enc


def _num(v: str) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# ---------------------------------------------------------------------------------------- runs
def finetune_eval(case: str, key: str, arm: str, seed: int, data: Path, targets: list[str], epochs: int,
                  size: int | None, init: Path | None) -> None:
    """``molmat finetune`` + ``molmat evaluate --split test`` for one arm/seed; store the metrics."""
    tag = f"n{size}" if size else "full"
    run = ARGS.workdir / "runs" / case / f"{tag}_e{epochs}" / f"{arm}_s{seed}"
    a = ["finetune", "--data", str(data), "--out", str(run),
         "--set", "finetune.targets=[" + ",".join(targets) + "]",
         "--set", f"train.seed={seed}", "--set", f"train.epochs={epochs}", "--set", f"train.patience={PATIENCE}"]
    if size:
        a += ["--set", f"finetune.max_train={size}"]
    if init is not None:
        a += ["--init", str(init)]
    e = ["evaluate", str(run), "--data", str(data), "--split", "test"]
    metrics_path = run / "eval_test" / "metrics.json"
    if metrics_path.exists() and (run / "result.json").exists() and _marker_ok(run, a):
        reuse_note(f"finetune {case} {key} {arm} seed {seed}", a)
        reuse_note(f"evaluate {case} {key} {arm} seed {seed}", e)
    else:
        if run.exists() and not _marker_ok(run, a):
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        _mark(run, a)
        log(f"{case} {key} {arm} seed {seed}: finetune {epochs} epochs")
        t = run_cmd(a, ARGS.workdir / "logs" / case / f"{tag}_{arm}_s{seed}_finetune.log",
                    f"finetune {case} {key} {arm} seed {seed}")
        (run / "bench_wall_s.txt").write_text(str(t["wall_s"]))
        run_cmd(e, ARGS.workdir / "logs" / case / f"{tag}_{arm}_s{seed}_evaluate.log",
                f"evaluate {case} {key} {arm} seed {seed}")
    m = json.loads(metrics_path.read_text())
    res = json.loads((run / "result.json").read_text())
    wall = run / "bench_wall_s.txt"
    entry = {"run": str(run), "test_records": m["records"], "result": res,
             "wall_s": float(wall.read_text()) if wall.exists() else None,
             "targets": {t: {"mae": v["mae"], "rmse": v["rmse"], "r2": v["r2"], "count": v["count"], "unit": v["unit"],
                             **({"log10_mae": v["log10"]["mae"]} if "log10" in v else {})}
                         for t, v in m["targets"].items()}}
    c = STATE["cases"].setdefault(case, {}).setdefault(key, {"epochs": epochs, "size": size, "targets": targets,
                                                              "scratch": {}, "pretrained": {}})
    c[arm][str(seed)] = entry
    summarize()
    write_results()


# ------------------------------------------------------------------------------------ analysis
def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _score(entry: dict[str, Any], t: str) -> float:
    """The scored MAE of a target: log10 MAE for moduli, MAE otherwise."""
    v = entry["targets"][t]
    return v.get("log10_mae", v["mae"])


def summarize() -> None:
    """Per case/key: mean +- std over seeds of each target's MAE, relative change, averages."""
    for case, keys in STATE["cases"].items():
        for key, c in keys.items():
            rows, rels = {}, []
            seeds = sorted(set(c["scratch"]) & set(c["pretrained"]), key=int)
            for t in c["targets"]:
                row: dict[str, Any] = {}
                for arm in ("scratch", "pretrained"):
                    xs = [_score(c[arm][s], t) for s in sorted(c[arm], key=int)]
                    row[arm] = dict(zip(("mean", "std"), _mean_std(xs)), n=len(xs), values=xs)
                    raw = [c[arm][s]["targets"][t]["mae"] for s in sorted(c[arm], key=int)]
                    row[arm + "_mae_raw"] = dict(zip(("mean", "std"), _mean_std(raw)))
                    some = next(iter(c[arm].values()), None)
                    if some:
                        row["unit"] = some["targets"][t]["unit"]
                row["scored"] = "log10 MAE" if t.endswith("_GPa") else "MAE"
                if seeds:
                    sc = _mean_std([_score(c["scratch"][s], t) for s in seeds])[0]
                    pr = _mean_std([_score(c["pretrained"][s], t) for s in seeds])[0]
                    row["rel_change"] = (pr - sc) / sc if sc else float("nan")
                    row["pretrained_better_seeds"] = sum(_score(c["pretrained"][s], t) < _score(c["scratch"][s], t)
                                                         for s in seeds)
                    row["paired_seeds"] = len(seeds)
                    rels.append(row["rel_change"])
                rows[t] = row
            c["summary"] = {"per_target": rows, "mean_rel_change": sum(rels) / len(rels) if rels else None,
                            "targets_improved": sum(r < 0 for r in rels), "targets_compared": len(rels),
                            "paired_seeds": len(seeds)}
            c["summary"]["verdict"] = _verdict(case, key, c)


def _verdict(case: str, key: str, c: dict[str, Any]) -> str | None:
    """A plain rule, the same for every case: the average relative change decides the label
    (below -2%: helped, above +2%: hurt, else no clear effect); per-target seed consistency is listed."""
    sm = c["summary"]
    r, n = sm["mean_rel_change"], sm["paired_seeds"]
    if r is None or not n:
        return None
    label = "pretraining helped" if r < -0.02 else "pretraining hurt" if r > 0.02 else "no clear effect (within +-2%)"
    pt = sm["per_target"]
    always = [t for t, x in pt.items() if x.get("pretrained_better_seeds") == n]
    never = [t for t, x in pt.items() if x.get("pretrained_better_seeds") == 0]
    return (f"{CASE_SHORT.get(case, case)}, {key}: {label}: average relative test-MAE change {r * 100:+.1f}% over "
            f"{sm['targets_compared']} target(s), {sm['targets_improved']} lower with pretraining; better in all {n} "
            f"paired seed(s): {', '.join(always) or 'none'}; worse in all: {', '.join(never) or 'none'}")


CASE_SHORT = {"qm9": "QM9", "qm8": "QM8 (SMILES only, transfer from QM9)", "mp_band_gap": "MP band gap",
              "mp_elastic": "mp_elastic log10 moduli (transfer from MP)"}


# ------------------------------------------------------------------------------------- writing
def _versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['molmat', 'torch', 'dgl', 'rdkit', 'pymatgen', 'numpy', 'lmdb', 'pydantic']}))")
    try:
        return json.loads(subprocess.check_output([PY, "-c", code], cwd=ROOT, text=True, stderr=subprocess.DEVNULL))
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    mem = ""
    try:
        mem = f"{int(next(l.split()[1] for l in open('/proc/meminfo') if l.startswith('MemTotal'))) / 2**20:.1f} GiB"
    except Exception:  # noqa: BLE001
        pass
    git = ""
    try:
        git = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        if subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True).strip():
            git += " (tracked files modified in the working tree)"
    except Exception:  # noqa: BLE001
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "python": platform.python_version(),
            "platform": platform.platform(), "git": git, "hostname": platform.node()}


def write_results() -> None:
    """Write STATE to infomax.json and infomax.md under ``--results`` (each replaced atomically)."""
    STATE["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    STATE["elapsed_min"] = round((time.time() - T0) / 60, 1)
    STATE["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
    out = ARGS.results
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "infomax.json.tmp"
    tmp.write_text(json.dumps(STATE, indent=1, default=str))
    tmp.replace(out / "infomax.json")
    tmp = out / "infomax.md.tmp"
    tmp.write_text(render_md())
    tmp.replace(out / "infomax.md")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


CASE_TITLES = {"qm9": "QM9 (2D MPNN fine-tuned on 8 targets; encoder pretrained on the QM9 train split)",
               "qm8": "QM8 from SMILES only (no geometry), CC2 targets; encoder pretrained on QM9 (transfer)",
               "mp_band_gap": "MP band gap (crystal neighbour-topology MPNN; encoder pretrained on the MP subset)",
               "mp_elastic": "mp_elastic, log10 K_VRH and G_VRH (encoder pretrained on the MP subset, transfer)"}


def render_md() -> str:
    """The Markdown report of STATE."""
    s = STATE
    L = ["# 3D Infomax: pretrained vs scratch fine-tuning (molmat)", ""]
    L += [f"- status: {s.get('status', 'running')}; last update {s['updated']} ({s['elapsed_min']} min after start)",
          f"- started: {s['started']}; command: `{s['bench_command']}` (cwd `{ROOT}`)",
          f"- machine: {s['machine']['nproc']} cores, {s['machine']['cpu']}, {s['machine']['memory']}, "
          f"Python {s['machine']['python']}, {s['machine']['platform']}; CPU only; git {s['machine']['git']}",
          f"- versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()),
          f"- load: another benchmark shared the machine; every molmat command ran under `nice -n 19` with "
          f"`OMP_NUM_THREADS=1`, strictly one at a time; load average at start {s['loadavg_start']}, now {s['loadavg_now']}",
          f"- budgets (fixed, no wall-clock limit, no early stopping: train.patience={PATIENCE}): "
          + "; ".join(f"{k}: {v}" for k, v in s["budgets"].items()),
          "- selection: molmat keeps the epoch with the best validation MAE (mean over targets, each scaled by its "
          "spread); the test split is used only by `molmat evaluate --split test` at the end",
          "- relative change = (pretrained - scratch) / scratch of the seed-mean test MAE (negative = pretraining "
          "helps); 'avg rel.' averages it over the case's targets; 'better' = seeds where the pretrained run beat "
          "the scratch run with the same seed", ""]
    for n in s["notes"]:
        L.append(f"- note: {n}")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append("| dataset | records | rejected | train/val/test | atoms/graph | source |")
    L.append("|---|---:|---:|---|---:|---|")
    for name, d in s["data"].items():
        sp = d["split"]
        L.append(f"| {name} | {d['records']} | {d['rejected']} | {sp['train']}/{sp['val']}/{sp['test']} "
                 f"({d['split_method']}, seed {d['split_seed']}) | {d['atoms_per_graph']:.1f} | {', '.join(d['sources'])} |")
    L.append("")
    if s["pretrain"]:
        L.append("## Pretraining (validation split of the pretraining data; NT-Xent, temperature 0.1)")
        L.append("")
        for name, p in s["pretrain"].items():
            r = p["result"]
            L.append(f"**enc_{name}** (data {p['data']}): {r['epochs_run']} epochs, {r['steps']} steps, "
                     f"{r['seconds'] / 60:.1f} min; best val_loss {r['best_metric']:.4g} at epoch {r['best_epoch']} "
                     f"(the saved encoder)")
            L.append("")
            L.append("| epoch | step | train_loss | val_loss | val contrastive accuracy | val alignment | val uniformity |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|")
            for e in p["epochs"]:
                L.append(f"| {int(e['epoch'])} | {int(e['step'])} | {_fmt(e['train_loss'])} | {_fmt(e['val_loss'])} | "
                         f"{_fmt(e['val_accuracy'])} | {_fmt(e['val_alignment'])} | {_fmt(e['val_uniformity'])} |")
            L.append("")
            L.append("Contrastive accuracy: fraction of 3D views whose nearest 2D embedding in the validation batch "
                     "(of 64) is their own; chance is about 1/64.")
            L.append("")
    for case, keys in s["cases"].items():
        L.append(f"## {CASE_TITLES.get(case, case)}")
        L.append("")
        for key, c in keys.items():
            sm = c.get("summary")
            if not sm:
                continue
            L.append(f"### {key}: {c['epochs']} fine-tuning epochs, seeds scratch {sorted(c['scratch'], key=int)}, "
                     f"pretrained {sorted(c['pretrained'], key=int)}")
            L.append("")
            L.append("| target | scored | unit | scratch (mean ± std) | pretrained (mean ± std) | rel. change | better | "
                     "scratch, other unit | pretrained, other unit |")
            L.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
            for t, r in sm["per_target"].items():
                unit = r.get("unit", "")
                scored_unit = f"log10({unit})" if r["scored"] == "log10 MAE" else unit
                ev = ("", "")
                if unit in ("Ha",):
                    ev = tuple(f"{r[a]['mean'] * HA_TO_EV:.4g} ± {r[a]['std'] * HA_TO_EV:.2g} eV" for a in ("scratch", "pretrained"))
                elif r["scored"] == "log10 MAE":  # the plain MAE in GPa beside the scored log10 MAE
                    ev = tuple(f"{r[a + '_mae_raw']['mean']:.4g} ± {r[a + '_mae_raw']['std']:.2g} GPa (MAE)"
                               for a in ("scratch", "pretrained"))
                rel = r.get("rel_change")
                rel_txt = f"{rel * 100:+.1f}%" if rel is not None and math.isfinite(rel) else "-"
                better = f"{r.get('pretrained_better_seeds', '-')}/{r.get('paired_seeds', '-')}"
                L.append(f"| {t} | {r['scored']} | {scored_unit} | {_fmt(r['scratch']['mean'])} ± {_fmt(r['scratch']['std'], 2)} | "
                         f"{_fmt(r['pretrained']['mean'])} ± {_fmt(r['pretrained']['std'], 2)} | {rel_txt} | {better} | "
                         f"{ev[0]} | {ev[1]} |")
            mr = sm["mean_rel_change"]
            L.append(f"| **average** | | | | | **{mr * 100:+.1f}%** | {sm['targets_improved']}/{sm['targets_compared']} targets | | |"
                     if mr is not None else "| average | | | | | - | | | |")
            L.append("")
            if any(r["scored"] == "log10 MAE" for r in sm["per_target"].values()):
                L.append("(moduli: the scored metric, and the relative change, use the log10 MAE from metrics.json; "
                         "the last columns give the plain MAE in GPa)")
                L.append("")
            walls = [(arm, e.get("wall_s"), e["result"]["best_epoch"], e["result"]["best_metric"])
                     for arm in ("scratch", "pretrained") for e in c[arm].values()]
            L.append("selected epoch (0-based, best validation) and its val_mae_scaled, per seed: " +
                     ", ".join(f"{a} {b} ({v:.4g})" for a, _, b, v in walls) +
                     "; wall s per fine-tune: " + ", ".join(f"{_fmt(w, 3)}" for _, w, _, _ in walls))
            L.append("")
    verdicts = [c["summary"]["verdict"] for keys in s["cases"].values() for c in keys.values()
                if c.get("summary", {}).get("verdict")]
    if verdicts:
        L.append("## Verdict (rule: average relative change < -2% helped, > +2% hurt, else no clear effect)")
        L.append("")
        L += [f"- {v}" for v in verdicts]
        L += [f"- {v}" for v in s.get("verdict", [])]
        L.append("")
    L += ["## Caveats (hold for every run of this script)", "",
          "- Short fixed budgets on a shared 2-core CPU: far fewer pretraining steps (10 epochs) and fine-tuning "
          "epochs than the paper; a pretrained start can win partly by converging faster within the budget. The "
          "selected (best-validation) epochs above show where each run peaked.",
          "- One random split (seed 0) per dataset; seeds vary only initialisation and batch order (the "
          "max_train subset is the same for every seed), so the ± spreads understate split/subset variance.",
          "- The validation contrastive accuracy is measured within batches of 64 and both views carry the "
          "elements, so a high value partly reflects composition matching, not only learned 3D information.",
          "- No extra conformers (one 3D view per molecule); default model sizes (MPNN hidden 64, 3 steps; "
          "SchNet hidden 64, 3 interactions)."]
    if "PYTHONPATH" in s.get("env", {}):  # runs made before bootstrap.py re-installed on package changes
        L.append("- Environment workaround: every molmat command ran with PYTHONPATH=<repo> because the .venv's "
                 "editable install predated pretrain/__init__.py and mapped `pretrain` as a namespace package.")
    L.append("")
    L.append("## Commands (exact, in order; 'reused' = output of an identical earlier command kept)")
    L.append("")
    L.append("```")
    for c in s["commands"]:
        extra = " [reused]" if c.get("reused") else f"   # {c.get('wall_s')} s"
        L.append(c["command"] + extra)
    L.append("```")
    L.append("")
    L.append(f"Repeat: `{s['bench_command']}`")
    return "\n".join(L) + "\n"


# -------------------------------------------------------------------------------------- overlap
def overlap_notes(qm9: Path | None, qm8: Path | None, mp: Path | None, el: Path | None) -> None:
    """How many fine-tuning test structures also appear among the (unlabelled) pretraining train structures."""
    code = r"""
import json, sys
from pipeline.shards import ShardDataset
def keys(d, part, field):
    s = json.load(open(d + "/split.json"))
    ds = ShardDataset(d, s[part])
    return {str(ds[i][field]) for i in range(len(ds))}
out = {}
a = json.loads(sys.argv[1])
if a.get("qm9") and a.get("qm8"):
    from rdkit import Chem
    def canon(s):
        m = Chem.MolFromSmiles(s)
        return Chem.MolToSmiles(m, isomericSmiles=False) if m is not None else s
    tr = {canon(x) for x in keys(a["qm9"], "train", "_smiles")}
    te = [canon(x) for x in keys(a["qm8"], "test", "_smiles")]
    out["qm8_test_in_qm9_pretrain"] = [sum(x in tr for x in te), len(te)]
if a.get("mp") and a.get("el"):
    tr = keys(a["mp"], "train", "_id")
    te = keys(a["el"], "test", "_id")
    out["elastic_test_in_mp_pretrain"] = [len(te & tr), len(te)]
    te2 = keys(a["mp"], "test", "_id")
    out["mp_test_in_mp_pretrain"] = [len(te2 & tr), len(te2)]
print(json.dumps(out))
"""
    arg = json.dumps({"qm9": str(qm9) if qm9 else None, "qm8": str(qm8) if qm8 else None,
                      "mp": str(mp) if mp else None, "el": str(el) if el else None})
    try:
        res = json.loads(subprocess.check_output(PREFIX + [PY, "-c", code, arg], cwd=ROOT, text=True,
                                                 env=dict(os.environ, **ENV), stderr=subprocess.DEVNULL).strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        log(f"overlap analysis failed: {exc}")
        return
    STATE.setdefault("overlap", {}).update(res)
    if "qm8_test_in_qm9_pretrain" in res:
        k, n = res["qm8_test_in_qm9_pretrain"]
        STATE["notes"].append(f"{k} of {n} QM8 test molecules (canonical SMILES, stereo ignored) are among the QM9 "
                              f"pretraining (train split) molecules; pretraining saw their 2D graph and 3D geometry, "
                              f"never a label")
    if "elastic_test_in_mp_pretrain" in res:
        k, n = res["elastic_test_in_mp_pretrain"]
        STATE["notes"].append(f"{k} of {n} mp_elastic test crystals (same mp-id) are in the MP pretraining train split "
                              f"(structures only, no labels)")
        k, n = res["mp_test_in_mp_pretrain"]
        STATE["notes"].append(f"MP band-gap test crystals in the MP pretraining set: {k} of {n} (the pretraining uses "
                              f"the train split only)")
    write_results()


# ------------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    """The command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default 3)")
    p.add_argument("--sizes", default="1000,5000", help="QM9 labelled training molecules (finetune.max_train)")
    p.add_argument("--qm8-sizes", default=None, help="QM8 labelled training molecules (default: --sizes)")
    p.add_argument("--epochs", default="40,15", help="fine-tuning epochs per size: an int, or a list matched to --sizes")
    p.add_argument("--pretrain-epochs", type=int, default=10, help="pretraining epochs (QM9 and MP encoders)")
    p.add_argument("--mp-epochs", type=int, default=15, help="fine-tuning epochs, MP band gap (whole train split)")
    p.add_argument("--elastic-epochs", type=int, default=40, help="fine-tuning epochs, mp_elastic (whole train split)")
    p.add_argument("--only", action="append", choices=["qm9", "qm8", "mp"], help="cases to run (repeatable; default all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/infomax/W"), help="shards, encoders, runs, logs")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where infomax.json/.md go")
    p.add_argument("--qm9-subset", type=int, default=0, help="first N molecules of the QM9 archive (0 = all 20k; smoke)")
    p.add_argument("--qm8-subset", type=int, default=0, help="first N rows of qm8.csv (0 = all; smoke)")
    p.add_argument("--mp-subset", type=int, default=8000, help="first N CIFs of mp/cifs.tar.gz (archive order)")
    p.add_argument("--elastic-subset", type=int, default=0, help="first N CIFs of mp_elastic (0 = all; smoke)")
    p.add_argument("--render-only", action="store_true", help="re-render infomax.md from --results/infomax.json")
    return p.parse_args()


def main() -> None:
    """Run the selected cases (or only re-render with ``--render-only``), writing results after each run."""
    global ARGS
    ARGS = a = parse_args()
    a.workdir = a.workdir.resolve()
    a.results = a.results.resolve()
    if a.render_only:  # re-summarise and re-render an existing infomax.json (no molmat command is run)
        STATE.clear()
        STATE.update(json.loads((a.results / "infomax.json").read_text()))
        updated, elapsed, load = STATE["updated"], STATE["elapsed_min"], STATE["loadavg_now"]
        summarize()
        write_results()
        STATE.update(updated=updated, elapsed_min=elapsed, loadavg_now=load)  # keep the run's own times
        (a.results / "infomax.json").write_text(json.dumps(STATE, indent=1, default=str))
        (a.results / "infomax.md").write_text(render_md())
        return
    sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    qm8_sizes = [int(x) for x in (a.qm8_sizes or a.sizes).split(",") if x.strip()]
    ep = [int(x) for x in a.epochs.split(",") if x.strip()]
    epochs = dict(zip(sizes, ep if len(ep) == len(sizes) else [ep[0]] * len(sizes)))
    if len(ep) not in (1, len(sizes)):
        raise SystemExit("--epochs: give one int or one per --sizes entry")
    only = set(a.only or ["qm9", "qm8", "mp"])
    seeds = list(range(a.seeds))
    (a.workdir / "logs").mkdir(parents=True, exist_ok=True)
    STATE.update(started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 bench_command="nice -n 19 " + shlex.join([os.path.relpath(sys.executable, ROOT)
                                                           if sys.executable.startswith(str(ROOT)) else sys.executable,
                                                           "bench/bench_infomax.py", *sys.argv[1:]]),
                 machine=_machine(), versions=_versions(), loadavg_start=[round(x, 2) for x in os.getloadavg()],
                 env=ENV, seeds=seeds,
                 budgets={"pretraining": f"{a.pretrain_epochs} epochs (batch 64) per encoder",
                          "QM9 fine-tuning": ", ".join(f"{n} molecules: {epochs[n]} epochs" for n in sizes),
                          "QM8 fine-tuning": ", ".join(f"{n} molecules: {epochs.get(n, ep[0])} epochs" for n in qm8_sizes),
                          "MP band gap": f"whole train split, {a.mp_epochs} epochs",
                          "mp_elastic": f"whole train split, {a.elastic_epochs} epochs",
                          "seeds": f"{len(seeds)} ({', '.join(map(str, seeds))}) per arm"})
    STATE["notes"] += [
        "QM9 was preprocessed without extra ETKDG conformers (preprocess.molecule.conformers=0) to save time: "
        "each molecule has one 3D view (its DFT geometry), as in the paper's QM9 setting with 1 conformer",
        "finetune.max_train draws its subset with the split seed (finetune/train.py), not train.seed: all seeds of "
        "one size fine-tune on the same molecules; seed variation is initialisation (heads; and the encoder for "
        "scratch) and batch order",
        "with --init the fine-tuning model takes the encoder's architecture (finetune/train.py); the encoder was "
        "pretrained with the default model.encoder2d settings, which are also what the scratch runs use",
    ]
    write_results()
    if a.qm9_subset or a.qm8_subset or a.elastic_subset:
        STATE["notes"].append(f"SMOKE-SIZED DATA: qm9_subset={a.qm9_subset}, qm8_subset={a.qm8_subset}, "
                              f"elastic_subset={a.elastic_subset}; numbers are not meaningful")
    qm9 = qm8 = mp = el = None
    enc_qm9 = enc_mp = None
    if only & {"qm9", "qm8"}:
        src = DATA / "qm9" / "qm9_20k.xyz.tar.bz2"
        if a.qm9_subset:
            src = subset_tar(src, a.workdir / "qm9_src", a.qm9_subset, ".xyz")
        qm9 = preprocess("qm9", [str(src)], QM9_TARGETS, [])
        enc_qm9 = pretrain("qm9", qm9, [])
    if "qm9" in only:
        for n in sizes:
            for s in seeds:
                for arm, init in (("scratch", None), ("pretrained", enc_qm9)):
                    finetune_eval("qm9", f"{n} labelled molecules", arm, s, qm9, QM9_TARGETS, epochs[n], n, init)
    if "qm8" in only:
        src = DATA / "qm8" / "qm8.csv"
        if a.qm8_subset:
            src = subset_csv(src, a.workdir / "qm8_src" / "qm8.csv", a.qm8_subset)
        qm8 = preprocess("qm8", [str(src)], None, ["preprocess.molecule.embed_smiles=false"])
        overlap_notes(qm9, qm8, None, None)
        for n in qm8_sizes:
            for s in seeds:
                for arm, init in (("scratch", None), ("pretrained", enc_qm9)):
                    finetune_eval("qm8", f"{n} labelled molecules", arm, s, qm8, QM8_TARGETS, epochs.get(n, ep[0]), n, init)
    if "mp" in only:
        src = subset_tar(DATA / "mp" / "cifs.tar.gz", a.workdir / "mp_src", a.mp_subset, ".cif", DATA / "mp" / "labels.csv")
        STATE["notes"].append("MP subset: " + (src / "SUBSET.txt").read_text().strip() + f" (extracted to {src})")
        mp = preprocess("mp", [str(src)], MP_TARGETS, [])
        el_src = DATA / "mp_elastic" / "cifs.tar.gz"
        if a.elastic_subset:
            el_src = subset_tar(el_src, a.workdir / "mp_elastic_src", a.elastic_subset, ".cif",
                                DATA / "mp_elastic" / "labels.csv")
        el = preprocess("mp_elastic", [str(el_src)], EL_TARGETS, [])
        overlap_notes(None, None, mp, el)
        enc_mp = pretrain("mp", mp, ["pretrain.encoder3d.cutoff=8.0"])
        for s in seeds:
            for arm, init in (("scratch", None), ("pretrained", enc_mp)):
                finetune_eval("mp_band_gap", "MP subset, whole train split", arm, s, mp, MP_TARGETS, a.mp_epochs, None, init)
        for s in seeds:
            for arm, init in (("scratch", None), ("pretrained", enc_mp)):
                finetune_eval("mp_elastic", "mp_elastic, whole train split", arm, s, el, EL_TARGETS, a.elastic_epochs, None, init)
    STATE["status"] = "finished"
    write_results()
    log(f"finished; results in {a.results / 'infomax.md'}")


if __name__ == "__main__":
    main()
