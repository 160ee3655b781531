"""The ``molmat`` command line: one subcommand per stage.

Every subcommand takes ``--config FILE`` and repeatable ``--set a.b=value``. Errors the user must
fix exit with status 2 and one line on stderr (``molmat: error: ...``); no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline import MolmatError, __version__
from pipeline.config import Config, load_config

log = logging.getLogger("molmat")

#: Exit status after SIGTERM/SIGUSR1 wrote last.pt (EX_TEMPFAIL); hpc/ templates requeue on it.
EXIT_REQUEUE = 75


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: the config.yaml shipped with molmat)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set preprocess.crystal.cutoff=6 (repeatable)")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _config_and_device(args: argparse.Namespace) -> tuple[Config, Any]:
    """The config, with ``train.threads`` applied, and the torch device ``train.device`` names.

    For evaluate/predict/embed these are all they take from the run config: the model's own
    ``config.json`` fixes architecture and featurisation.
    """
    import torch

    from pipeline.training import pick_device

    cfg = _config(args)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    return cfg, pick_device(cfg.train.device)


# ------------------------------------------------------------------------------------ preprocess
def cmd_preprocess(args: argparse.Namespace) -> int:
    """``molmat preprocess SOURCE... --out DIR`` (or ``--merge PART_DIR... --out DIR``)."""
    from pipeline.preprocess import merge, preprocess, summarize_rejects

    cfg = _config(args)
    if args.merge:
        summary = merge(args.merge, args.out, cfg)
    else:
        if not args.sources:
            raise MolmatError("preprocess needs at least one SOURCE (file, directory or archive)")
        targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        summary = preprocess(args.sources, args.out, cfg, fmt=args.format, labels=args.labels, targets=targets,
                             workers=args.workers, part=args.part, parts=args.parts)
    print(f"wrote {summary.records} records in {summary.shards} shard(s) to {summary.out} "
          f"({summary.rejected} rejected, {summary.seconds:.1f} s)")
    print("targets: " + ", ".join(f"{t['name']} [{t['unit']}]" for t in summary.targets))
    if summary.rejected:
        for line in summarize_rejects(summary.out):
            print(f"  rejected: {line}")
        print(f"  full list: {Path(summary.out) / 'rejects.jsonl'}")
    return 0


# --------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """``molmat inspect DIR [--verify]``: counts, targets, stats, rejects; optional full checksum pass."""
    from pipeline.preprocess import summarize_rejects
    from pipeline.shards import STATS, load_manifest, verify

    manifest = load_manifest(args.dir)
    stats = json.loads((Path(args.dir) / STATS).read_text())
    print(f"{args.dir}: {manifest['records']} records in {len(manifest['shards'])} shard(s), "
          f"{manifest['rejected']} rejected; format v{manifest['format_version']}, molmat {manifest['code_version']}")
    for inp in manifest["inputs"][:5]:
        print(f"  input {inp['path']} ({inp['format']}, sha256 {inp['sha256'][:12]})")
    if len(manifest["inputs"]) > 5:
        print(f"  ... {len(manifest['inputs']) - 5} more input files")
    print("targets:")
    for name, t in stats["targets"].items():
        print(f"  {name:32s} [{t['unit']}]  n={t['count']:<7d} mean={t['mean']:.6g} std={t['std']:.6g}")
    pg = stats["per_graph"]
    print(f"atoms/graph mean {pg['atoms']['mean']:.1f} (min {pg['atoms']['min']}, max {pg['atoms']['max']}); "
          f"bonds/graph {pg['bonds']['mean']:.1f}; neighbour edges/graph {pg['neighbors']['mean']:.1f}")
    top = sorted(stats["elements"].items(), key=lambda kv: -kv[1])[:12]
    print("elements: " + ", ".join(f"{el} {n}" for el, n in top) + (" ..." if len(stats["elements"]) > 12 else ""))
    for line in summarize_rejects(args.dir):
        print(f"  rejected: {line}")
    if args.verify:
        checked, problems = verify(args.dir)
        if problems:
            for p in problems[:20]:
                print(f"molmat: verify: {p}", file=sys.stderr)
            print(f"molmat: error: verify failed: {len(problems)} problem(s), {checked} records read fine", file=sys.stderr)
            return 1
        print(f"verify: all {checked} records read back and match their checksums")
    return 0


# ------------------------------------------------------------------------------ finetune & co.
def _distributed_stage(name: str, run: Callable[..., Any], args: argparse.Namespace, product: Path) -> int:
    """Run a training stage as one process, or as one rank under torchrun/srun.

    ``run(rank=, world_size=, device=)`` returns a TrainResult. A stop by SIGTERM/SIGUSR1 exits
    with :data:`EXIT_REQUEUE` on every rank, so that a Slurm script can requeue the job.
    """
    from pipeline import distributed

    cfg, device = _config_and_device(args)
    denv = distributed.detect()
    device = distributed.setup(denv, device)
    ok = False
    try:
        result = run(cfg, rank=denv.rank, world_size=denv.world_size, device=device)
        ok = True
    finally:
        distributed.teardown(barrier=ok)
    if result.stopped_by == "signal":
        if denv.rank == 0:
            print(f"{name}: stopped by a signal; state saved in {Path(args.out) / 'last.pt'}; re-run the same "
                  "command to resume", file=sys.stderr)
        return EXIT_REQUEUE
    if denv.rank == 0:
        print(f"{name}: {result.epochs_run} epoch(s), {result.steps} steps, stopped by {result.stopped_by}; best "
              f"validation {result.best_metric:.4g} at epoch {result.best_epoch}; output in {product}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``molmat finetune --data SHARDS --out RUN [--init ENCODER_DIR]``."""
    from finetune.train import finetune

    return _distributed_stage("finetune", lambda cfg, **kw: finetune(args.data, args.out, cfg, init=args.init, **kw),
                              args, Path(args.out) / "best")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``molmat pretrain --data SHARDS... --out ENC``."""
    from pretrain.train import pretrain

    return _distributed_stage("pretrain", lambda cfg, **kw: pretrain(args.data, args.out, cfg, **kw), args,
                              Path(args.out))


def cmd_embed(args: argparse.Namespace) -> int:
    """``molmat embed RUN_OR_ENC INPUT... --out FILE``."""
    from pretrain.embed import embed

    _, device = _config_and_device(args)
    n = embed(args.path, args.inputs, args.out, which=args.which, fmt=args.format or "auto", device=device)
    print(f"wrote {n} embedding(s) to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``molmat evaluate RUN --data SHARDS [--split test|val|train|all] [--out DIR]``."""
    from finetune.evaluate import evaluate
    from pipeline.config import write_resolved

    cfg, device = _config_and_device(args)
    out = Path(args.out) if args.out else Path(args.run) / f"eval_{args.split}"
    metrics = evaluate(args.run, args.data, args.split, out, device=device)
    write_resolved(cfg, out)
    for name, m in metrics["targets"].items():
        extra = f"  (log10 MAE {m['log10']['mae']:.4g})" if "log10" in m else ""
        print(f"{name:32s} MAE {m['mae']:.4g} {m['unit']}  RMSE {m['rmse']:.4g}  R2 {m['r2']:.3f}  n={m['count']}{extra}")
    print(f"metrics and parity plots in {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``molmat predict RUN INPUT... --out FILE.csv``."""
    from finetune.predict import predict

    _, device = _config_and_device(args)
    rows = predict(args.run, args.inputs, args.out, fmt=args.format or "auto", device=device)
    print(f"wrote {rows} row(s) to {args.out}")
    return 0


def _stage_finetune_evaluate(cfg: Config, out: Path) -> None:
    """`molmat run` stage: fine-tune and evaluate on each dataset with a small budget."""
    from finetune.evaluate import evaluate
    from finetune.train import finetune

    for ds in cfg.run.datasets:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.max_minutes = cfg.run.finetune_minutes
        run_cfg.finetune.targets = ds.targets
        model_dir = out / "models" / ds.name
        result = finetune(out / "data" / ds.name, model_dir, run_cfg)
        print(f"[finetune] {ds.name}: {result.epochs_run} epochs, {result.steps} steps ({result.stopped_by}) -> {model_dir}")
        metrics = evaluate(model_dir, out / "data" / ds.name, "test")
        for name, m in metrics["targets"].items():
            print(f"[evaluate] {ds.name} test {name}: MAE {m['mae']:.4g} {m['unit']}, R2 {m['r2']:.3f}, n={m['count']}")


# ------------------------------------------------------------------------------------------- run
def _project_path(path: str) -> str:
    """A relative path from the config as given if it exists here, else relative to the molmat checkout.

    So that ``molmat run`` with the default config finds the shipped samples from any directory.
    """
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    candidate = Path(__file__).resolve().parent.parent / p
    return str(candidate) if candidate.exists() else str(p)


STAGES: dict[str, Callable[[Config, Path], None]] = {"finetune+evaluate": _stage_finetune_evaluate}


def cmd_run(args: argparse.Namespace) -> int:
    """``molmat run``: every stage in order on the datasets named in the config's ``run`` section."""
    from pipeline.config import write_resolved
    from pipeline.preprocess import preprocess

    cfg = _config(args)
    out = Path(args.out or cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out)
    if not cfg.run.datasets:
        raise MolmatError("config has no run.datasets; nothing to run")
    for ds in cfg.run.datasets:
        data_dir = out / "data" / ds.name
        sources = [_project_path(s) for s in ds.sources]
        labels = _project_path(ds.labels) if ds.labels else None
        summary = preprocess(sources, data_dir, cfg, fmt=ds.format, labels=labels, targets=ds.targets)
        print(f"[preprocess] {ds.name}: {summary.records} records, {summary.rejected} rejected, "
              f"{summary.shards} shard(s) -> {data_dir} ({summary.seconds:.1f} s)")
    for name, stage in STAGES.items():
        stage(cfg, out)
    print(f"run finished: outputs in {out}")
    return 0


# -------------------------------------------------------------------------------- density labels
def cmd_density_labels(args: argparse.Namespace) -> int:
    """``molmat density-labels INPUT... --out DIR``: DFT density cubes with PySCF, resumable."""
    from pipeline.density_labels import FAILURES, LABELS, generate

    cfg = _config(args)
    dl = cfg.density_labels
    for flag, key in (("workers", "workers"), ("limit", "limit"), ("start", "start"), ("basis", "basis"),
                      ("functional", "functional"), ("spacing", "spacing"), ("margin", "margin"),
                      ("grid_level", "grid_level"), ("conv_tol", "conv_tol")):
        value = getattr(args, flag)
        if value is not None:
            try:
                setattr(dl, key, value)
            except ValueError as exc:  # pydantic's ValidationError, raised by validate_assignment
                raise MolmatError(f"--{flag.replace('_', '-')} {value!r}: {exc.errors()[0]['msg']}") from None
    if args.no_density_fit:
        dl.density_fit = False
    summary = generate(args.inputs, args.out, cfg, fmt=args.format or "auto", retry_failed=args.retry_failed)
    per_mol = f", {summary.scf_seconds / summary.computed:.1f} s SCF per molecule" if summary.computed else ""
    print(f"density-labels: {summary.computed} computed, {summary.failed} failed, {summary.skipped} skipped "
          f"(finished or failed before) in {summary.seconds:.0f} s{per_mol}; cubes and {LABELS} in {summary.out}")
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  failed: {n} x {reason}")
    if summary.failed:
        print(f"  full list: {Path(summary.out) / FAILURES}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="molmat", description="Graph learning for molecules and crystals.")
    parser.add_argument("--version", action="version", version=f"molmat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="raw files -> LMDB graph shards")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="file, directory or archive")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--labels", help="labels CSV (CIF directory/archive, SDF)")
    p.add_argument("--format", help="input format (qm9_xyz, sdf, smiles_csv, cif, pymatgen_json); default: detect")
    p.add_argument("--targets", help="comma-separated label names to keep")
    p.add_argument("--workers", type=int, help="worker processes (default from config)")
    p.add_argument("--part", type=int, default=0, help="process part I of --parts N (Slurm array index)")
    p.add_argument("--parts", type=int, default=1, help="number of parts")
    p.add_argument("--merge", nargs="+", metavar="PART_DIR", help="merge finished part directories into --out")
    _common(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("inspect", help="summarise a shard directory; --verify checks every record")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="re-read every record and check its checksum")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pretrain", help="3D Infomax: align the 2D MPNN with the 3D encoder on shards")
    p.add_argument("--data", required=True, nargs="+", help="shard directories (molecules and/or crystals)")
    p.add_argument("--out", required=True, help="encoder directory")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("embed", help="embeddings of raw structures from an encoder or model directory")
    p.add_argument("path", metavar="RUN_OR_ENC", help="encoder directory (molmat pretrain) or run/model directory")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="output .npz (or .csv)")
    p.add_argument("--which", default="2d", choices=["2d", "3d"], help="encoder of an encoder directory")
    p.add_argument("--format", help="input format (default: detect)")
    _common(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("finetune", help="train property heads (and the encoder) on shards")
    p.add_argument("--data", required=True, help="shard directory (with split.json)")
    p.add_argument("--out", required=True, help="run directory (best/, last.pt, metrics.csv)")
    p.add_argument("--init", help="pretrained encoder directory")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="metrics and parity plots of a trained model on shards")
    p.add_argument("run", help="run or model directory")
    p.add_argument("--data", required=True, help="shard directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--out", help="output directory (default RUN/eval_SPLIT)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict properties for raw structure files")
    p.add_argument("run", help="run or model directory")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="xyz/sdf/csv/cif/json files, directories or archives")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--format", help="input format (default: detect)")
    _common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("run", help="all stages on the datasets in the config (the shipped samples by default)")
    p.add_argument("--out", help="run directory (default: run.out from the config)")
    _common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("density-labels", help="DFT electron densities (PySCF) on grids, one cube file per molecule")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="molecule files, directories or archives (xyz, sdf, csv)")
    p.add_argument("--out", required=True, help="output directory (cubes, labels.jsonl, failures.jsonl)")
    p.add_argument("--format", help="input format (default: detect)")
    p.add_argument("--workers", type=int, help="processes, one per core (default density_labels.workers; 0 = all cores)")
    p.add_argument("--start", type=int, help="skip the first K records")
    p.add_argument("--limit", type=int, help="label at most N records (after --start)")
    p.add_argument("--functional", help="XC functional (default PBE)")
    p.add_argument("--basis", help="AO basis (default def2-SVP)")
    p.add_argument("--no-density-fit", action="store_true", help="exact Coulomb (four-index integrals in memory) instead of density fitting")
    p.add_argument("--grid-level", type=int, help="PySCF XC grid level 0-9")
    p.add_argument("--conv-tol", type=float, help="SCF energy convergence threshold (Hartree)")
    p.add_argument("--spacing", type=float, help="uniform grid step (bohr, default 0.25)")
    p.add_argument("--margin", type=float, help="box margin around the atoms (bohr, default 4)")
    p.add_argument("--retry-failed", action="store_true", help="also redo molecules listed in failures.jsonl")
    _common(p)
    p.set_defaults(func=cmd_density_labels)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except MolmatError as exc:
        print(f"molmat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("molmat: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
