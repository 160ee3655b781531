"""Issue 12 benchmark: speed and accuracy of ``molmat density-labels`` settings (PySCF, one thread).

On a few real QM9 molecules of ``../shared/data/density/qm9_pbe_def2svp_dm`` (every 33rd row of
its ``index.csv``: reference PBE/def2-SVP density matrices made with PySCF defaults: no density
fitting, XC grid level 3, conv_tol 1e-9), each setting below runs one SCF per molecule through
``pipeline.density_labels.run_scf`` (what ``density-labels`` runs) and is scored against the
reference density matrix on the uniform grid ``density-labels`` writes (0.25 bohr, 4 bohr margin):

* SCF wall and CPU seconds (1 thread: OMP/OpenBLAS/MKL threads set to 1 before numpy is imported);
* NMAE = sum|rho - rho_ref| / sum|rho_ref| over the grid points (%), and the largest |rho - rho_ref|;
* electrons on the uniform grid (Riemann sum) and on the setting's own DFT grid; energy error.

Usage::

    nice -n 10 .venv/bin/python bench/bench_density_labels.py            # the recorded run (~12 min)
    .venv/bin/python bench/bench_density_labels.py --molecules 1 --settings df_g2_1e-8 --results /tmp/smoke
    nice -n 10 .venv/bin/python bench/bench_density_labels.py --uniform-counts   # no SCF (~5 min)

Writes ``bench/results/density_labels.json`` and ``density_labels.md``. ``--uniform-counts`` instead
integrates every reference density of the folder on the density-labels grid (0.25 bohr, and 0.125
bohr for comparison) and writes ``density_uniform_counts.{json,md}``: how far the Riemann sum on a
uniform grid is from the electron count.
"""
from __future__ import annotations

import os

# One thread per SCF, as in density-labels' workers; must be set before numpy/PySCF load BLAS.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import DensityLabelsConfig  # noqa: E402
from pipeline.cube import BOHR_ANGSTROM, CubeGrid, grid_points, voxel_volume_bohr3  # noqa: E402
from pipeline.density_labels import (density_errors, electrons_on_dft_grid, evaluate_density,  # noqa: E402
                                     load_density_matrix, run_scf, uniform_grid)

REF_DIR = Path("/work/shared/data/density/qm9_pbe_def2svp_dm")

#: name -> (density fitting, XC grid level, conv_tol); the first is the reference's own recipe.
SETTINGS: dict[str, tuple[bool, int, float]] = {
    "nodf_g3_1e-9": (False, 3, 1e-9),
    "df_g3_1e-9": (True, 3, 1e-9),
    "df_g2_1e-9": (True, 2, 1e-9),
    "df_g1_1e-9": (True, 1, 1e-9),
    "df_g3_1e-6": (True, 3, 1e-6),
    "df_g2_1e-8": (True, 2, 1e-8),
    "df_g1_1e-7": (True, 1, 1e-7),
    "df_g1_1e-6": (True, 1, 1e-6),
    "nodf_g1_1e-7": (False, 1, 1e-7),
}


def _machine() -> dict[str, Any]:
    """nproc, CPU model, memory, load average, versions and git head."""
    import pyscf

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) / 2 ** 20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), float("nan"))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        head = "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_GiB": round(mem, 1), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "pyscf": pyscf.__version__,
            "git_head": head, "loadavg_start": os.getloadavg()}


def _molecules(n: int) -> list[dict[str, str]]:
    with open(REF_DIR / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[::33][:n]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecules", type=int, default=4, help="how many reference molecules (every 33rd row)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated setting names")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="output folder")
    ap.add_argument("--append", action="store_true", help="add the runs of --settings to the recorded results "
                    "(same molecules) instead of replacing them")
    ap.add_argument("--uniform-counts", action="store_true", help="electron counts of every reference density on "
                    "uniform grids (no SCF)")
    args = ap.parse_args(argv)
    if args.uniform_counts:
        return uniform_counts(Path(args.results), argv)
    import pyscf

    pyscf.lib.num_threads(1)
    names = [s for s in args.settings.split(",") if s]
    base = DensityLabelsConfig()
    machine = _machine()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    for mol_row in _molecules(args.molecules):
        ref = load_density_matrix(REF_DIR / mol_row["file"])
        origin, axes, shape = uniform_grid(ref.pos_angstrom, base.spacing, base.margin)
        grid = CubeGrid(z=ref.z, positions=ref.pos_angstrom, origin=origin, axes=axes, shape=shape,
                        values=np.zeros(tuple(int(n) for n in shape)))
        pts_bohr = grid_points(grid) / BOHR_ANGSTROM
        dv = voxel_volume_bohr3(grid)
        rho_ref = evaluate_density(ref.mol(), ref.dm, pts_bohr)
        ref_uniform = float(rho_ref.sum() * dv)
        print(f"{mol_row['file']}: {mol_row['n_atoms']} atoms, {mol_row['n_electrons']} electrons, grid "
              f"{'x'.join(str(int(n)) for n in shape)}; reference on the uniform grid {ref_uniform:.4f} e", flush=True)
        for name in names:
            df, level, tol = SETTINGS[name]
            settings = base.model_copy(update={"density_fit": df, "grid_level": level, "conv_tol": tol}).model_dump()
            load0 = os.getloadavg()[0]
            cpu0 = time.process_time()
            scf = run_scf(ref.z, ref.pos_angstrom, settings)
            cpu = time.process_time() - cpu0
            t0 = time.perf_counter()
            rho = evaluate_density(scf.mol, scf.dm, pts_bohr)
            grid_s = time.perf_counter() - t0
            err = density_errors(rho, rho_ref)
            row = {"molecule": mol_row["file"], "n_atoms": int(mol_row["n_atoms"]),
                   "n_electrons": int(mol_row["n_electrons"]), "setting": name, "density_fit": df,
                   "grid_level": level, "conv_tol": tol, "scf_seconds": round(scf.seconds, 2),
                   "scf_cpu_seconds": round(cpu, 2), "scf_cycles": scf.cycles, "grid_eval_seconds": round(grid_s, 2),
                   "nmae_percent": 100 * err["nmae"], "max_abs_e_bohr3": err["max_abs"],
                   "electrons_uniform": float(rho.sum() * dv), "electrons_uniform_reference": ref_uniform,
                   "electrons_dft_grid": electrons_on_dft_grid(scf), "energy_error_uHa":
                   1e6 * (scf.energy - float(ref.meta["energy_hartree"])), "loadavg_1min": load0,
                   "grid_points": int(np.prod(shape))}
            rows.append(row)
            print(f"  {name:14s} SCF {row['scf_seconds']:6.1f} s (cpu {row['scf_cpu_seconds']:6.1f}, "
                  f"{row['scf_cycles']} cycles)  NMAE {row['nmae_percent']:.5f} %  max {row['max_abs_e_bohr3']:.2e}  "
                  f"N_uniform {row['electrons_uniform']:.4f}  N_dft {row['electrons_dft_grid']:.6f}  "
                  f"dE {row['energy_error_uHa']:+.1f} uHa  load {load0:.2f}", flush=True)
    machine["loadavg_end"] = os.getloadavg()
    summary = _summary(rows)
    command = "nice -n 10 .venv/bin/python bench/bench_density_labels.py " + " ".join(shlex.quote(a) for a in
                                                                                     (argv or sys.argv[1:]))
    result = {"benchmark": "density_labels", "started": started,
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command.strip(),
              "machine": machine, "grid": {"spacing_bohr": base.spacing, "margin_bohr": base.margin},
              "reference": str(REF_DIR), "summary": summary, "rows": rows}
    out = Path(args.results)
    if args.append:
        previous = json.loads((out / "density_labels.json").read_text())
        previous["rows"] = [x for x in previous["rows"] if x["setting"] not in names] + rows
        previous["summary"] = _summary(previous["rows"])
        previous.setdefault("appended", []).append({"command": result["command"], "started": started,
                                                    "finished": result["finished"], "machine": machine,
                                                    "settings": names})
        result = previous
    out.mkdir(parents=True, exist_ok=True)
    (out / "density_labels.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "density_labels.md").write_text(_markdown(result))
    print(f"wrote {out / 'density_labels.md'} and .json")
    return 0


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting (in first-seen order): means and worst cases over the molecules."""
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        sel = [r for r in rows if r["setting"] == name]
        out.append({
            "setting": name, "density_fit": sel[0]["density_fit"], "grid_level": sel[0]["grid_level"],
            "conv_tol": sel[0]["conv_tol"], "scf_seconds_mean": float(np.mean([r["scf_seconds"] for r in sel])),
            "scf_cpu_seconds_mean": float(np.mean([r["scf_cpu_seconds"] for r in sel])),
            "nmae_percent_mean": float(np.mean([r["nmae_percent"] for r in sel])),
            "nmae_percent_max": float(np.max([r["nmae_percent"] for r in sel])),
            "max_abs_e_bohr3": float(np.max([r["max_abs_e_bohr3"] for r in sel])),
            "dft_grid_electron_error_max": float(np.max([abs(r["electrons_dft_grid"] - r["n_electrons"]) for r in sel])),
            "uniform_electron_excess_percent_mean": float(np.mean(
                [100 * (r["electrons_uniform"] / r["n_electrons"] - 1) for r in sel])),
            "energy_error_uHa_max": float(np.max([abs(r["energy_error_uHa"]) for r in sel]))})
    return out


def uniform_counts(out: Path, argv: list[str] | None) -> int:
    """Riemann sums of every reference density on uniform grids of 0.25 and 0.125 bohr (4 bohr margin)."""
    import pyscf

    pyscf.lib.num_threads(1)
    machine = _machine()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with open(REF_DIR / "index.csv", newline="") as fh:
        files = [r["file"] for r in csv.DictReader(fh)]
    rows = []
    for i, f in enumerate(files):
        ref = load_density_matrix(REF_DIR / f)
        mol = ref.mol()
        row: dict[str, Any] = {"molecule": f, "n_atoms": len(ref.z), "n_electrons": int(ref.z.sum())}
        # 0.125 bohr has 8x the points: every 11th molecule only, to keep the run near 10 minutes.
        for spacing in ((0.25, 0.125) if i % 11 == 0 else (0.25,)):
            origin, axes, shape = uniform_grid(ref.pos_angstrom, spacing, 4.0)
            grid = CubeGrid(z=ref.z, positions=ref.pos_angstrom, origin=origin, axes=axes, shape=shape,
                            values=np.zeros(tuple(int(n) for n in shape)))
            rho = evaluate_density(mol, ref.dm, grid_points(grid) / BOHR_ANGSTROM)
            row[f"electrons_{spacing:g}"] = float(rho.sum() * voxel_volume_bohr3(grid))
            if spacing == 0.25:  # on the 0.25 grid: where the excess or deficit sits
                near = np.zeros(rho.size, dtype=bool)
                pts = grid_points(grid)
                for p in ref.pos_angstrom:  # points within 0.5 bohr of a nucleus
                    near |= np.linalg.norm(pts - p, axis=1) < 0.5 * BOHR_ANGSTROM
                row["electrons_0.25_within_0.5bohr_of_nuclei"] = float(rho[near].sum() * voxel_volume_bohr3(grid))
        rows.append(row)
        print(f"{f}: N={row['n_electrons']}  0.25 bohr: {row['electrons_0.25']:.4f}  0.125 bohr: "
              f"{row.get('electrons_0.125', float('nan')):.4f}", flush=True)
    machine["loadavg_end"] = os.getloadavg()
    stats = {}
    for spacing in ("0.25", "0.125"):
        rel = np.array([100 * (r[f"electrons_{spacing}"] / r["n_electrons"] - 1) for r in rows
                        if f"electrons_{spacing}" in r])
        stats[spacing] = {"mean_percent": float(rel.mean()), "median_percent": float(np.median(rel)),
                          "std_percent": float(rel.std()), "min_percent": float(rel.min()),
                          "max_percent": float(rel.max()), "mean_abs_percent": float(np.abs(rel).mean()),
                          "under_counted": int((rel < 0).sum()), "molecules": len(rel)}
    command = "nice -n 10 .venv/bin/python bench/bench_density_labels.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"benchmark": "density_uniform_counts", "started": started, "command": command.strip(),
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "reference": str(REF_DIR), "margin_bohr": 4.0, "stats": stats, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "density_uniform_counts.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Electrons on uniform grids: Riemann sums of exact PBE/def2-SVP densities (issue 12)", "",
             f"- date: {started}; command: `{result['command']}`",
             f"- machine: nproc={machine['nproc']}, {machine['cpu']}; pyscf {machine['pyscf']}",
             f"- densities: every density matrix of `{REF_DIR}` ({len(rows)} QM9 molecules), evaluated exactly at "
             "the points of density-labels' grid (axis-aligned box, 4 bohr margin); N(grid) = sum(rho) * voxel volume; "
             "0.125 bohr for every 11th molecule only (8x the points)",
             "", "| spacing (bohr) | mean N(grid)/N - 1 | median | std | min | max | mean abs | under-counted |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spacing, st in stats.items():
        lines.append(f"| {spacing} | {st['mean_percent']:+.2f}% | {st['median_percent']:+.2f}% | {st['std_percent']:.2f}% | "
                     f"{st['min_percent']:+.2f}% | {st['max_percent']:+.2f}% | {st['mean_abs_percent']:.2f}% | "
                     f"{st['under_counted']} of {st['molecules']} |")
    lines += ["", "| molecule | atoms | N | N(0.25) | N(0.25) within 0.5 bohr of nuclei | N(0.125) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['molecule']} | {r['n_atoms']} | {r['n_electrons']} | {r['electrons_0.25']:.4f} | "
                     f"{r['electrons_0.25_within_0.5bohr_of_nuclei']:.4f} | "
                     + (f"{r['electrons_0.125']:.4f} |" if "electrons_0.125" in r else "- |"))
    (out / "density_uniform_counts.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'density_uniform_counts.md'} and .json")
    return 0


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    mols = sorted({(x["molecule"], x["n_atoms"], x["n_electrons"]) for x in r["rows"]})
    lines = [
        "# density-labels settings: SCF time and density error (issue 12)", "",
        f"- date: {r['started']} (finished {r['finished']})",
        f"- command: `{r['command']}`",
        f"- machine: nproc={m['nproc']}, CPU: {m['cpu']}, memory {m['memory_GiB']} GiB, {m['platform']}; no GPU; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_end'])} (2 cores shared with another developer's work)",
        f"- versions: python {m['python']}, pyscf {m['pyscf']}, numpy {m['numpy']}, git {m['git_head']}",
        *[f"- appended: settings {', '.join(a['settings'])} by `{a['command']}` at {a['started']} (load average "
          f"{', '.join(f'{x:.2f}' for x in a['machine']['loadavg_start'])} at start)" for a in r.get("appended", [])],
        "- one thread (OMP/OpenBLAS/MKL_NUM_THREADS=1), one SCF at a time, PBE/def2-SVP, RKS, PySCF's initial guess",
        f"- molecules (every 33rd row of `{r['reference']}/index.csv`): "
        + ", ".join(f"{f} ({a} atoms, {e} e)" for f, a, e in mols),
        f"- reference: that folder's density matrices (no density fitting, XC grid level 3, conv_tol 1e-9); "
        f"uniform grid of density-labels ({r['grid']['spacing_bohr']} bohr, margin {r['grid']['margin_bohr']} bohr)",
        "- NMAE = sum|rho - rho_ref| / sum|rho_ref| over the grid points; max = largest |rho - rho_ref| (e/bohr^3); "
        "'N(uniform)/N - 1' = the Riemann sum on the uniform grid over the electron count, minus 1; 'DFT-grid error' = |N(own XC grid) - N|", "",
        "## Mean over the molecules", "",
        "| setting | DF | XC grid | conv_tol | SCF s (wall) | SCF s (CPU) | NMAE % mean | NMAE % max | max abs | "
        "DFT-grid error max (e) | N(uniform)/N - 1 | |dE| max (uHa) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["summary"]:
        lines.append(f"| {s['setting']} | {'yes' if s['density_fit'] else 'no'} | {s['grid_level']} | {s['conv_tol']:g} | "
                     f"{s['scf_seconds_mean']:.1f} | {s['scf_cpu_seconds_mean']:.1f} | {s['nmae_percent_mean']:.5f} | "
                     f"{s['nmae_percent_max']:.5f} | {s['max_abs_e_bohr3']:.2e} | {s['dft_grid_electron_error_max']:.2e} | "
                     f"{s['uniform_electron_excess_percent_mean']:+.2f}% | {s['energy_error_uHa_max']:.1f} |")
    lines += ["", "## Every run", "",
              "| molecule | setting | SCF s | CPU s | cycles | NMAE % | max abs | N uniform | N uniform (ref) | N DFT grid | "
              "dE (uHa) | load |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['molecule']} | {x['setting']} | {x['scf_seconds']:.1f} | {x['scf_cpu_seconds']:.1f} | "
                     f"{x['scf_cycles']} | {x['nmae_percent']:.5f} | {x['max_abs_e_bohr3']:.2e} | "
                     f"{x['electrons_uniform']:.4f} | {x['electrons_uniform_reference']:.4f} | "
                     f"{x['electrons_dft_grid']:.6f} | {x['energy_error_uHa']:+.1f} | {x['loadavg_1min']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
