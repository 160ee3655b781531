"""The ``molmat`` command line: one subcommand per stage.

Every subcommand takes ``--config FILE`` and repeatable ``--set a.b=value``. Errors the user must
fix exit with status 2 and one line on stderr (``molmat: error: ...``); no traceback.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

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
    density = json.loads((Path(summary.out) / "manifest.json").read_text()).get("density")
    if density:
        print(f"density grids: {density['records']} ({density['content']} electrons); train with molmat finetune")
    if summary.rejected:
        for line in summarize_rejects(summary.out):
            print(f"  rejected: {line}")
        print(f"  full list: {Path(summary.out) / 'rejects.jsonl'}")
    return 0


# --------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """``molmat inspect DIR [--verify]``: counts, targets, stats, rejects; optional full checksum pass.

    With ``--config``/``--set``, also says whether the directory's featurisation is the one that
    config would make (what a model trained with that config compares).
    """
    from pipeline.preprocess import summarize_rejects
    from pipeline.shards import load_manifest, load_stats, verify

    manifest = load_manifest(args.dir)
    stats = load_stats(args.dir)
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
    if args.config or args.overrides:
        from pipeline.featurize import featurization_spec

        ours, theirs = featurization_spec(_config(args).preprocess), manifest.get("featurization", {})
        diff = [f"{k}: config {ours.get(k)!r} vs shards {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                if ours.get(k) != theirs.get(k)]
        print("featurisation: " + ("as the given config makes it" if not diff else "differs from the given config: "
                                   + "; ".join(diff)))
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

    return _distributed_stage("finetune", lambda cfg, **kw: finetune(args.data, args.out, cfg, init=args.init,
                                                                    restart=args.restart, **kw),
                              args, Path(args.out) / "best")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``molmat pretrain --data SHARDS... --out ENC``."""
    from pretrain.train import pretrain

    return _distributed_stage("pretrain", lambda cfg, **kw: pretrain(args.data, args.out, cfg, restart=args.restart,
                                                                    **kw), args, Path(args.out))


def cmd_embed(args: argparse.Namespace) -> int:
    """``molmat embed RUN_OR_ENC INPUT... --out FILE``."""
    from pretrain.embed import embed

    _, device = _config_and_device(args)
    n = embed(args.path, args.inputs, args.out, which=args.which, fmt=args.format or "auto", device=device)
    print(f"wrote {n} embedding(s) to {args.out}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """``molmat ensemble RUN RUN... --out DIR``."""
    from finetune.ensemble import make_ensemble

    ens = make_ensemble(args.members, args.out)
    print(f"{args.out}: ensemble of {len(ens.members)} models ({', '.join(t.name for t in ens.targets)}); "
          f"evaluate and predict take it like one model")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``molmat evaluate RUN --data SHARDS [--split test|val|train|all] [--limit N] [--out DIR]``."""
    from finetune.evaluate import evaluate, metrics_table
    from finetune.modeldata import default_eval_out
    from pipeline.config import write_resolved

    cfg, device = _config_and_device(args)
    out = Path(args.out) if args.out else default_eval_out(args.run, args.split)
    metrics = evaluate(args.run, args.data, args.split, out, device=device, limit=args.limit)
    write_resolved(cfg, out)
    if metrics.get("kind") == "density":
        from finetune.density import density_table

        print(f"{args.split} split of {args.data}, {metrics['records']} structures, full grids:")
        print(density_table(metrics))
        print(f"metrics.json, metrics.csv and density slices (slice_<id>.png) in {out}")
        return 0
    print(f"{args.split} split of {args.data}, {metrics['records']} records, in physical units:")
    print(metrics_table(metrics))
    print(f"metrics.json, metrics.csv, predictions.csv and parity plots in {out}")
    return 0


def cmd_curvature(args: argparse.Namespace) -> int:
    """``molmat curvature RUN --data SHARDS [--split val] [--tasks a,b] [--params all|encoder|heads] [--out DIR]``."""
    from finetune.curvature import COMPARISON_PNG, JSON_NAME, curvature, default_out, summary_table
    from pipeline.config import write_resolved

    cfg, device = _config_and_device(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = Path(args.out) if args.out else default_out(args.run, args.split)
    result = curvature(args.run, args.data, args.split, tasks, args.params, out, cfg.curvature, device=device)
    write_resolved(cfg, out)
    print(f"loss curvature of {args.run} on {result['records']} structures of the {args.split} split of {args.data}, "
          f"{result['params']} parameters ({result['n_params']:,}), {result['dtype']}, {result['device']}:")
    print(summary_table(result))
    cost = result["cost"]
    print(f"one HVP costs {cost['ratio_autograd']:.2f} gradients by double backprop, {cost['ratio_fd']:.2f} by finite "
          f"differences; {result['seconds']:.0f} s in all")
    if result["no_labels"]:
        print(f"no labelled structure in the selected set for: {', '.join(result['no_labels'])}")
    if not result["complete"]:
        print(f"incomplete: curvature.max_minutes={cfg.curvature.max_minutes} reached; not run: "
              f"{', '.join(result['not_run'])}", file=sys.stderr)
    print(f"{JSON_NAME}, {COMPARISON_PNG} and one curvature_<task>.png per task in {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``molmat predict RUN INPUT... --out FILE.csv`` (property model), or for a density model
    ``molmat predict RUN [INPUT] --out FILE.cube|DIR/ [--grid-spacing A] [--margin A] [--grid-like REF.cube]``
    and ``molmat predict RUN INPUT --points FILE.npy|.csv --out FILE.npy|.csv`` (finetune.predict_density)."""
    from pipeline.checkpoint import CONFIG, DENSITY_MODEL, KINDS, read_model_config, resolve_model_dir

    _, device = _config_and_device(args)
    try:  # only the kind here; the loader reads (and translates, and logs about) the whole config once
        fmt = json.loads((resolve_model_dir(args.run) / CONFIG).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt not in KINDS:
        fmt = read_model_config(args.run)[1]["format"]   # raises, saying what the directory lacks
    if fmt == DENSITY_MODEL:
        from finetune.predict_density import predict_density

        results = predict_density(args.run, args.inputs, args.out, grid_spacing=args.grid_spacing,
                                  margin=args.margin, grid_like=args.grid_like, points=args.points,
                                  fmt=args.format or "auto", device=device, stride=args.grid_stride)
        for r in results:
            if r.error:
                print(f"molmat: skipped: {r.summary()}", file=sys.stderr)
            else:
                print(r.summary())
                if r.warning:
                    print(f"  warning: {r.warning}")
        failed = sum(1 for r in results if r.error)
        if failed:
            print(f"{len(results) - failed} written, {failed} skipped", file=sys.stderr)
        return 0
    given = [flag for flag, value in (("--grid-spacing", args.grid_spacing), ("--margin", args.margin),
                                      ("--grid-like", args.grid_like), ("--points", args.points),
                                      ("--grid-stride", args.grid_stride)) if value is not None]
    what = KINDS[fmt].what
    if given:
        raise MolmatError(f"{args.run}: holds a {what}; {', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                          "density models only")
    if not args.inputs:
        raise MolmatError("predict needs at least one INPUT structure file")
    from finetune.predict import predict

    rows = predict(args.run, args.inputs, args.out, fmt=args.format or "auto", device=device)
    print(f"wrote {rows} row(s) to {args.out}")
    return 0


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


@dataclass(frozen=True)
class RunStep:
    """One stage applied to one dataset (or, for pretraining, to all of them) in ``molmat run``.

    Attributes:
        stage: a key of :data:`STAGES`.
        dataset: the dataset's name from ``run.datasets`` (with the arm, ``qm9 (scratch)``), or
            ``all``.
        out: the step's output directory.
        args: what the stage function needs (sources, shard directories, encoder, model).
    """

    stage: str
    dataset: str
    out: Path
    args: dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """What ``molmat run`` knows about a stage.

    Attributes:
        is_complete: ``is_complete(out)``: the step's output is whole, so a rerun skips it (a
            stage that was interrupted finds its own partial output and resumes).
        run: ``run(step, cfg)`` makes the output; training stages return their ``TrainResult``.
        headline: ``headline(out)``: the number to look at, as a short text.
    """

    is_complete: Callable[[Path], bool]
    run: Callable[[RunStep, Config], Any]
    headline: Callable[[Path], str]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _run_preprocess(step: RunStep, cfg: Config) -> None:
    from pipeline.preprocess import preprocess

    preprocess(step.args["sources"], step.out, cfg, fmt=step.args["format"], labels=step.args["labels"],
               targets=step.args["targets"])


def _headline_preprocess(out: Path) -> str:
    m = _read_json(out / "manifest.json")
    return f"{m['records']} records, {m['rejected']} rejected; targets {', '.join(t['name'] for t in m['targets'])}"


def _budgeted(cfg: Config, minutes: float) -> Config:
    """A copy of the config with a wall-clock training budget."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.train.max_minutes = minutes
    return run_cfg


def _run_pretrain(step: RunStep, cfg: Config) -> Any:
    from pretrain.train import pretrain

    return pretrain(step.args["data"], step.out, _budgeted(cfg, cfg.run.pretrain_minutes))


def _best_row(out: Path) -> dict[str, str]:
    """The ``metrics.csv`` row of a finished run's best epoch."""
    best = _read_json(out / "result.json")["best_epoch"]
    with open(out / "metrics.csv", newline="") as fh:
        return next((r for r in csv.DictReader(fh) if int(r["epoch"]) == best), {})


def _headline_pretrain(out: Path) -> str:
    r, row = _read_json(out / "result.json"), _best_row(out)
    return (f"val contrastive accuracy {float(row.get('val_accuracy', 'nan')):.3f}, val loss "
            f"{float(row.get('val_loss', 'nan')):.3f} (best epoch {r['best_epoch']} of {r['epochs_run']})")


def _run_finetune(step: RunStep, cfg: Config) -> Any:
    from finetune.train import finetune

    run_cfg = _budgeted(cfg, cfg.run.finetune_minutes)
    match = step.args.get("match_epochs_of")
    if match is not None and (match / "result.json").exists():
        # The comparison arm trains for as many epochs as the pretrained arm did, so that both
        # see the same data and steps; wall-clock budgets alone would hand more steps to the arm
        # that ran while the machine was less busy. Twice the budget stops it if it is much slower.
        run_cfg.train.epochs = max(1, int(_read_json(match / "result.json")["epochs_run"]))
        run_cfg.train.max_minutes = 2 * cfg.run.finetune_minutes
    run_cfg.finetune.targets = step.args["targets"]
    run_cfg.finetune.init = None  # the arm decides: the pretrained encoder, or none (scratch)
    return finetune(step.args["data"], step.out, run_cfg, init=step.args["init"])


def _training_complete(out: Path) -> bool:
    """``result.json`` exists and the run was not stopped by a signal (SIGTERM/SIGUSR1 write
    ``result.json`` too, after saving ``last.pt`` to resume from)."""
    path = out / "result.json"
    return path.exists() and _read_json(path).get("stopped_by") != "signal"


def _headline_finetune(out: Path) -> str:
    r = _read_json(out / "result.json")
    conf = _read_json(out / "best" / "config.json") if (out / "best" / "config.json").exists() else {}
    model = conf.get("model", {})
    # which encoders and loss the run used: with model slots and the loss on auto, that depends on the data's kind
    encoders = " + ".join(f"{model[s]['name']} ({s[-2:].upper()})" for s in ("encoder2d", "encoder3d")
                          if isinstance(model.get(s), dict))
    loss = conf.get("finetune", {}).get("loss")
    encoders += f", {loss} loss" if encoders and loss else ""
    # lr and batch size on auto also depend on the kind; the run's resolved config has the values used
    resolved = out / "config.resolved.yaml"
    train = (yaml.safe_load(resolved.read_text()) or {}).get("train", {}) if resolved.exists() else {}
    if encoders and isinstance(train.get("lr"), (int, float)) and isinstance(train.get("batch_size"), int):
        encoders += f", lr {train['lr']:g}, batch {train['batch_size']}"
    return (f"{encoders + ': ' if encoders else ''}best val MAE/spread {r['best_metric']:.4g} at epoch "
            f"{r['best_epoch']} of {r['epochs_run']} (stopped by {r['stopped_by']})")


def _run_evaluate(step: RunStep, cfg: Config) -> None:
    from finetune.evaluate import evaluate, metrics_table

    metrics = evaluate(step.args["model"], step.args["data"], "test", step.out)
    print(f"[evaluate] {step.dataset}, test split:\n" + metrics_table(metrics))


def _evaluation_complete(out: Path) -> bool:
    """``metrics.json`` exists and is newer than the evaluated model's ``result.json``."""
    # metrics.json of an older model is stale: the model's result.json is written when it finishes
    metrics, model = out / "metrics.json", out.parent / "result.json"
    return metrics.exists() and (not model.exists() or metrics.stat().st_mtime >= model.stat().st_mtime)


def _headline_evaluate(out: Path) -> str:
    m = _read_json(out / "metrics.json")["targets"]
    return "test MAE " + ", ".join(f"{name} {t['mae']:.4g} {t['unit']}" for name, t in m.items())


#: The stages of ``molmat run``, in order (``pipeline.config.RUN_STAGES``). The density and
#: curvature stages join here when they exist: one entry each and their steps in :func:`_run_plan`.
STAGES: dict[str, Stage] = {
    "preprocess": Stage(lambda out: (out / "manifest.json").exists(), _run_preprocess, _headline_preprocess),
    "pretrain": Stage(_training_complete, _run_pretrain, _headline_pretrain),
    "finetune": Stage(_training_complete, _run_finetune, _headline_finetune),
    "evaluate": Stage(_evaluation_complete, _run_evaluate, _headline_evaluate),
}


def _run_plan(cfg: Config, out: Path) -> list[RunStep]:
    """Every step of ``molmat run`` for the config, in order.

    Layout of ``out``: ``data/<dataset>/`` (shards), ``pretrain/`` (the encoder, from every
    dataset's train split), ``models/<dataset>/<arm>/`` (``pretrained``: fine-tuned from that
    encoder within ``run.finetune_minutes``; ``scratch``: from random weights, for as many epochs
    as the pretrained arm ran) with ``eval_test/`` inside.
    """
    stages = set(cfg.run.stages)
    data = {ds.name: out / "data" / ds.name for ds in cfg.run.datasets}
    steps = []
    if "preprocess" in stages:
        steps += [RunStep("preprocess", ds.name, data[ds.name],
                          {"sources": [_project_path(s) for s in ds.sources], "format": ds.format,
                           "labels": _project_path(ds.labels) if ds.labels else None, "targets": ds.targets})
                  for ds in cfg.run.datasets]
    encoder = out / "pretrain"
    if "pretrain" in stages:
        steps.append(RunStep("pretrain", "all", encoder, {"data": [str(d) for d in data.values()]}))
    arms = ([("pretrained", str(encoder))] if "pretrain" in stages else []) + [("scratch", None)]
    for ds in cfg.run.datasets:
        for arm, init in arms:
            model = out / "models" / ds.name / arm
            if "finetune" in stages:
                match = out / "models" / ds.name / "pretrained" if arm == "scratch" and len(arms) == 2 else None
                steps.append(RunStep("finetune", f"{ds.name} ({arm})", model, {
                    "data": data[ds.name], "targets": ds.targets, "init": init, "match_epochs_of": match}))
            if "evaluate" in stages:
                steps.append(RunStep("evaluate", f"{ds.name} ({arm})", model / "eval_test",
                                     {"model": model, "data": data[ds.name]}))
    return steps


def _comparison(steps: list[RunStep]) -> list[str]:
    """Markdown rows: test MAE per dataset and target, fine-tuned from the encoder vs from scratch."""
    evals = {s.dataset: s.out / "metrics.json" for s in steps
             if s.stage == "evaluate" and (s.out / "metrics.json").exists()}
    rows = []
    for name, path in evals.items():
        if not name.endswith("(pretrained)"):
            continue
        scratch = evals.get(name.replace("(pretrained)", "(scratch)"))
        if scratch is None:
            continue
        a, b = _read_json(path)["targets"], _read_json(scratch)["targets"]
        for target, m in a.items():
            if target in b:
                change = 100 * (m["mae"] / b[target]["mae"] - 1) if b[target]["mae"] else float("nan")
                rows.append(f"| {name.split(' (')[0]} | {target} | {m['unit']} | {b[target]['mae']:.4g} | "
                            f"{m['mae']:.4g} | {change:+.1f}% |")
    if not rows:
        return []
    return ["| dataset | target | unit | test MAE, scratch | test MAE, pretrained | change |",
            "|---|---|---|---:|---:|---:|"] + rows


def cmd_run(args: argparse.Namespace) -> int:
    """``molmat run``: every stage in order on the datasets named in the config's ``run`` section.

    A step whose output is complete is skipped, so re-running after an interruption (or after
    adding a dataset) does only what is missing; an interrupted training step resumes from its
    ``last.pt``. Ends with a summary table (also written to ``RUN/summary.md``).
    """
    from pipeline.config import write_resolved

    cfg = _config(args)
    out = Path(args.out or cfg.run.out)
    if not cfg.run.datasets:
        raise MolmatError("config has no run.datasets; nothing to run")
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out)
    steps = _run_plan(cfg, out)
    status = {}
    t_all = time.time()
    for i, step in enumerate(steps):
        stage = STAGES[step.stage]
        if stage.is_complete(step.out):
            status[i] = "skipped (complete)"
            print(f"[{step.stage}] {step.dataset}: already complete in {step.out}; skipped", flush=True)
            continue
        print(f"[{step.stage}] {step.dataset}: running -> {step.out}", flush=True)
        t0 = time.time()
        result = stage.run(step, cfg)
        if getattr(result, "stopped_by", None) == "signal":
            print(f"[{step.stage}] {step.dataset}: stopped by a signal; state saved in {step.out / 'last.pt'}; re-run "
                  "the same command to resume", file=sys.stderr)
            return EXIT_REQUEUE
        status[i] = f"ran ({time.time() - t0:.0f} s)"
        print(f"[{step.stage}] {step.dataset}: {stage.headline(step.out)}", flush=True)
    table = ["| stage | dataset | status | output | headline |", "|---|---|---|---|---|"]
    for i, step in enumerate(steps):
        table.append(f"| {step.stage} | {step.dataset} | {status[i]} | {os.path.relpath(step.out, out)} | "
                     f"{STAGES[step.stage].headline(step.out)} |")
    comparison = _comparison(steps)
    summary = [f"# molmat run: {out}", "", *table] + (["", "Test MAE, pretrained vs scratch:", "", *comparison]
                                                        if comparison else [])
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n" + "\n".join(summary[2:]))
    print(f"\nrun finished in {time.time() - t_all:.0f} s: outputs in {out}, this table in {out / 'summary.md'}")
    return 0


# -------------------------------------------------------------------------------- density labels
def cmd_density_labels(args: argparse.Namespace) -> int:
    """``molmat density-labels INPUT... --out DIR``: DFT density cubes with PySCF, resumable."""
    from pipeline.density_labels import FAILURES, LABELS, generate

    cfg = _config(args)
    dl = cfg.density_labels
    for flag, key in (("workers", "workers"), ("threads", "threads"), ("limit", "limit"), ("start", "start"),
                      ("basis", "basis"),
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
          f"(finished or failed before) in {summary.seconds:.0f} s{per_mol}; cubes (CHGCAR for crystals) and {LABELS} in {summary.out}")
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  failed: {n} x {reason}")
    if summary.failed:
        print(f"  full list: {Path(summary.out) / FAILURES}")
    return 0


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _one_line(exc: BaseException) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives with the
    worker's traceback in its message; its last line is the error."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n")).strip()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="molmat", description="Graph learning for molecules and crystals.")
    parser.add_argument("--version", action="version", version=f"molmat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="raw files -> LMDB graph shards")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="file, directory or archive")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--labels", help="labels CSV (CIF or POSCAR file/directory/archive, SDF)")
    p.add_argument("--format", help="input format (qm9_xyz, sdf, smiles_csv, cif, pymatgen_json, poscar, extxyz, "
                   "ase_db, density: cube files, CHGCARs, grid folders); default: detect from file names")
    p.add_argument("--targets", help="comma-separated label names to keep")
    p.add_argument("--workers", type=_count, help="worker processes (default from config; 0 = in this process)")
    p.add_argument("--part", type=_count, default=0, help="process part I of --parts N (Slurm array index)")
    p.add_argument("--parts", type=_positive, default=1, help="number of parts")
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
    p.add_argument("--restart", action="store_true", help="start afresh: move the state of the run OUT holds "
                   "(last.pt, the encoder, metrics) to OUT/previous/")
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
    p.add_argument("--init", help="pretrained encoder directory (molmat pretrain), or a fine-tuned model whose "
                   "encoders start this one (transfer learning; its heads are not used)")
    p.add_argument("--restart", action="store_true", help="start afresh: move the state of the run OUT holds "
                   "(last.pt, best/, metrics) to OUT/previous/")
    _common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("ensemble", help="join fine-tuned models (other seeds or encoders, same shards and split) into "
                       "one model directory that averages them")
    p.add_argument("members", nargs="+", metavar="RUN", help="run or model directories of `molmat finetune`")
    p.add_argument("--out", required=True, help="ensemble directory to write")
    _common(p)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("evaluate", help="metrics and parity plots of a trained model on shards")
    p.add_argument("run", help="run or model directory, or a shipped model's name (e.g. qm9-density)")
    p.add_argument("--data", required=True, help="shard directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--out", help="output directory (default RUN/eval_SPLIT; for a shipped model ./eval_NAME_SPLIT)")
    p.add_argument("--limit", type=int, help="only the first N records of the split (full-grid density evaluation "
                   "takes seconds per structure)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("curvature", help="Hessian spectrum of each target's loss of a trained model (top "
                       "eigenvalues, trace, density) on a fixed set of structures")
    p.add_argument("run", help="run or model directory")
    p.add_argument("--data", required=True, help="shard directory")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--tasks", help="comma-separated targets and/or 'total' (default: every target and total)")
    p.add_argument("--params", choices=["all", "encoder", "heads"],
                   help="parameters the Hessian is taken over (default curvature.params)")
    p.add_argument("--out", help="output directory (default RUN/curvature_SPLIT)")
    _common(p)
    p.set_defaults(func=cmd_curvature)

    p = sub.add_parser("predict", help="predict properties (CSV) or electron densities (cube, points) for raw "
                       "structure files")
    p.add_argument("run", help="run or model directory, or a shipped model's name (e.g. qm9-density)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="xyz/extxyz/sdf/csv/cif/json/POSCAR/ASE .db files, "
                   "directories or archives (a density model also reads the atoms of cube and CHGCAR files)")
    p.add_argument("--out", required=True, help="property model: CSV file to write; density model: a .cube[.gz] "
                   "file, a directory (one <id>.cube per structure), or with --points a .npy/.csv file")
    p.add_argument("--format", help="input format (default: detect)")
    p.add_argument("--grid-spacing", type=float, metavar="A", help="density model: grid step in Angstrom (default "
                   "0.2); a molecule's box is its atoms plus --margin, a crystal's grid tiles its cell")
    p.add_argument("--margin", type=float, metavar="A", help="density model: box margin around a molecule's atoms in "
                   "Angstrom (default 2.117 = 4 bohr)")
    p.add_argument("--grid-like", metavar="REF.cube", help="density model: predict on exactly REF's grid; the atoms "
                   "are INPUT's, or REF's own when no INPUT is given")
    p.add_argument("--grid-stride", type=int, metavar="N", help="density model, grids: the network on every N-th point "
                   "per axis, log density splined between, points within density.direct_radius of an atom direct "
                   "(default density.grid_stride of the model, 2); 1 = every point")
    p.add_argument("--points", metavar="FILE", help="density model: .npy (P, 3) or .csv (x,y,z) positions in "
                   "Angstrom; --out .npy gets the (P,) densities, .csv x,y,z,rho_e_per_bohr3 rows")
    _common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("run", help="every stage (preprocess, pretrain, finetune from it and from scratch, evaluate) "
                       "on the datasets in the config (the shipped samples by default); completed steps are skipped")
    p.add_argument("--out", help="run directory (default: run.out from the config)")
    _common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("density-labels", help="DFT electron densities (PySCF) on grids, one cube file per molecule "
                       "(crystals with --set density_labels.crystals=true: periodic DFT, one CHGCAR each)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="molecule files, directories or archives (xyz, sdf, csv; "
                   "cif/POSCAR/json crystals when density_labels.crystals is on)")
    p.add_argument("--out", required=True, help="output directory (cubes, labels.jsonl, failures.jsonl)")
    p.add_argument("--format", help="input format (default: detect)")
    p.add_argument("--workers", type=int, help="processes, one molecule each (default density_labels.workers; 0 = one "
                   "per core, at most --limit)")
    p.add_argument("--threads", type=int, help="threads per process (default density_labels.threads; 0 = the cores "
                   "shared out among the processes)")
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
    from pipeline.allocator import keep_freed_memory

    keep_freed_memory()   # before torch allocates: 10-20 MB tensors are reused, not re-mapped every step
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except MolmatError as exc:
        print(f"molmat: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (disk full, read-only, a file where a directory belongs), not a bug
        from pipeline.files import environment_error

        print(f"molmat: error: {_one_line(environment_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("molmat: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
