"""``molmat finetune``: train property heads (and the encoders) on a shard directory."""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline import MolmatError
from pipeline.checkpoint import (PROPERTY_MODEL, data_identity, load_pretrained_encoders,
                                 prepare_run_dir, pretrained_model_config, save_model_dir)
from pipeline.config import AUTO, Config, ModelConfig, write_resolved
from pipeline.distributed import gather_objects
from pipeline.featurize import neighbour_cutoff
from pipeline.graphs import GraphBatch, collate
from pipeline.loader import make_loader
from pipeline.models import check_encoder_cutoff
from pipeline.models.property import PropertyModel, target_specs
from pipeline.shards import ShardDataset, dataset_has_coordinates, dataset_kinds, load_manifest, load_stats
from pipeline.splits import load_split
from pipeline.training import Callback, Trainer, TrainResult, pick_device, seed_everything
from finetune.losses import property_losses, weighted_total
from finetune.metrics import validation_metrics
from finetune.modeldata import TargetColumns, predict_loader, target_columns

log = logging.getLogger("molmat.finetune")

#: The largest learning rate at which PaiNN's plain blocks trained in every run on MP crystals; at
#: 2e-3 they diverged in 3 of 7 (bench/results/crystal_optim), with ``block_norm`` in none.
PLAIN_PAINN_MAX_LR = 1e-3


class PropertyTask:
    """The fine-tuning :class:`pipeline.training.Task`: per-target losses, validation MAE, ``best/``.

    Args:
        model: the property model being trained (the plain module; its normalisation is used).
        loss_kind: ``mse``, ``l1`` or ``huber``.
        device: where validation runs.
        best_dir: where :meth:`save_best` writes the model directory.
        meta: the rest of the model directory's ``config.json``.
    """

    monitor = "val_mae_scaled"

    def __init__(self, model: PropertyModel, loss_kind: str, device: torch.device, best_dir: Path,
                 meta: dict[str, Any]) -> None:
        self.model, self.loss_kind, self.device, self.best_dir, self.meta = model, loss_kind, device, best_dir, meta

    def collate(self, records: list[dict[str, Any]]) -> GraphBatch:
        """Records -> :class:`GraphBatch` with the graph views the model reads."""
        return collate(records, self.model.views())

    def loss(self, model: nn.Module, batch: GraphBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted mean of the per-target losses; the parts are ``loss_<target>`` (NaN when unlabelled)."""
        # called through the (DDP) wrapper: gradient sync needs the wrapped forward
        losses, count = property_losses(model, self.model, batch, self.loss_kind)
        total = weighted_total(losses, count, self.model.loss_weight)
        values = losses.detach().tolist()
        parts = {f"loss_{s.name}": (v if c > 0 else math.nan) for s, v, c in zip(self.model.targets, values, count.tolist())}
        return total, parts

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Per-target validation MAE in physical units and their spread-scaled mean."""
        # each rank predicts its share of the validation batches; all ranks score the union
        parts = gather_objects(predict_loader(model, loader, self.device))
        res = {k: np.concatenate([p[k] for p in parts]) for k in ("pred", "y", "mask")}
        return validation_metrics(res, model.targets, model.std.cpu().numpy())

    def save_best(self, model: nn.Module) -> None:
        """Write ``RUN/best/``."""
        save_model_dir(self.best_dir, model, PROPERTY_MODEL, self.meta)


def finetune(data: str | Path, out: str | Path, config: Config, init: str | None = None,
             rank: int = 0, world_size: int = 1, device: torch.device | None = None,
             callbacks: tuple[Callback, ...] = (), restart: bool = False) -> TrainResult:
    """Fine-tune a property model on the train split of a shard directory.

    Writes ``RUN/best/`` (deployable model), ``RUN/last.pt`` (resume state), ``RUN/metrics.csv``,
    ``RUN/timing.json``, ``RUN/run.json`` (what the run is), ``RUN/config.resolved.yaml`` and
    ``RUN/result.json``. Re-running the same command resumes; re-running into ``RUN`` with other
    data, targets or model is refused with what differs, unless ``restart`` (``--restart``),
    which moves the old run's state to ``RUN/previous/`` and starts afresh.
    """
    out = Path(out)
    fcfg, tcfg = config.finetune, config.train
    manifest = load_manifest(data)
    if manifest.get("density"):
        # density shards train the probe model of `density:` (finetune.density), not property heads
        from finetune.density import finetune_density

        return finetune_density(data, out, config, init, rank, world_size, device, callbacks, restart)
    split = load_split(data)
    if not split["val"]:
        # Early stopping and the choice of the best model need held-out data; monitoring the
        # train split instead would report a training error as if it were a validation error.
        raise MolmatError(f"{data}/split.json has an empty val split; fine-tuning needs one. Re-run preprocess "
                          "with --set split.val=0.1 (the shards are kept, only split.json is rewritten)")
    specs = target_specs(manifest["targets"], fcfg.targets, fcfg.log10_targets, fcfg.extensive_targets, fcfg.loss_weights,
                         fcfg.gated_targets, fcfg.composition_baseline_targets)
    kinds = dataset_kinds(manifest)
    if not tcfg.is_resolved():
        # like the loss: resolved before the run's identity, so a resumed run keeps its settings
        tcfg = tcfg.resolve(kinds)
        config = config.model_copy(update={"train": tcfg})
        if rank == 0:
            log.info("lr %g, batch size %d for %s data (train.by_kind)", tcfg.lr, tcfg.batch_size, "/".join(kinds))
    if fcfg.loss == AUTO:
        # resolved before the run's identity is taken: a resumed run keeps the loss it started with
        fcfg = fcfg.model_copy(update={"loss": fcfg.resolved_loss(kinds)})
        config = config.model_copy(update={"finetune": fcfg})
        if rank == 0:
            log.info("loss for %s data (finetune.loss_by_kind): %s", "/".join(kinds), fcfg.loss)
    if tcfg.compile and fcfg.curvature_weighting.enabled:
        raise MolmatError("train.compile and finetune.curvature_weighting cannot be combined: compiled blocks "
                          "are not twice differentiable, and curvature weighting takes Hessian-vector products")
    init = init or fcfg.init
    model_cfg, slots = config.model.resolve(kinds), []
    if not config.model.is_resolved() and rank == 0:
        log.info("model for %s data (model.auto): encoder2d %s, encoder3d %s", "/".join(kinds),
                 model_cfg.encoder2d.name if model_cfg.encoder2d else "null",
                 model_cfg.encoder3d.name if model_cfg.encoder3d else "null")
    if init:
        # A pretrained encoder brings its architecture: the fine-tuning model must match it. A
        # slot left on auto takes the pretrained encoder of its view rather than the kind default.
        auto = [s for s in ("encoder2d", "encoder3d") if getattr(config.model, s) == AUTO]
        model_cfg, slots = pretrained_model_config(model_cfg, init, replace=auto)
        config = config.model_copy(deep=True)
        config.model = model_cfg
        if rank == 0:
            log.info("fine-tuning from %s: architecture of %s taken from it", init, ", ".join(slots))
    if rank == 0:
        warn_unstable_painn(model_cfg, tcfg.lr)
    if model_cfg.encoder3d is not None:
        if dataset_has_coordinates(manifest) != "all":
            raise MolmatError(f"{data}: model.encoder3d ({model_cfg.encoder3d.name}) needs 3D coordinates, but not every "
                              "record has them (SMILES preprocessed with preprocess.molecule.embed_smiles=false?)")
        check_encoder_cutoff(model_cfg.encoder3d, neighbour_cutoff(manifest["featurization"], kinds), str(data))
    seed_everything(tcfg.seed)
    device = device or pick_device(tcfg.device)
    train_idx = split["train"]
    if fcfg.max_train is not None and fcfg.max_train < len(train_idx):
        pick = np.random.default_rng(split["seed"]).permutation(len(train_idx))[: fcfg.max_train]
        train_idx = sorted(train_idx[i] for i in pick)
    if not train_idx:
        raise MolmatError(f"{data}: the train split is empty")
    # Targets are selected by column; the model sees only its own targets.
    columns = target_columns(manifest, specs, str(data))
    train_set = TargetColumns(ShardDataset(data, train_idx), columns)
    val_set = TargetColumns(ShardDataset(data, split["val"]), columns)
    stats = load_stats(data)
    # what this run is: a re-run into `out` resumes only the same run (or starts afresh with --restart)
    identity = {"data": data_identity(data), "targets": [t.name for t in specs],
                "model": model_cfg.model_dump(mode="json"),
                # disabled curvature weighting leaves the run as it was: runs from before the option resume
                "finetune": fcfg.model_dump(mode="json", exclude={"init", "targets"} |
                                            (set() if fcfg.curvature_weighting.enabled else {"curvature_weighting"})),
                "init": str(Path(init).resolve()) if init else None}
    prepare_run_dir(out, identity, restart, rank, world_size)
    model = PropertyModel(model_cfg, specs)
    if init:
        load_pretrained_encoders(model, init, slots, manifest["featurization"], kinds)
        if rank == 0:
            log.info("initialised %s from %s", ", ".join(slots), init)
    model.fit_normalization(make_loader(train_set, 256, None, tcfg.num_workers,
                                        collate_fn=functools.partial(collate, views=model.views())))
    model.to(device)
    groups = _param_groups(model, fcfg.freeze_encoder, fcfg.encoder_lr, tcfg.lr)
    meta = {"model": model_cfg.model_dump(mode="json"), "targets": model.describe(),
            "finetune": fcfg.model_dump(mode="json"), "featurization": manifest["featurization"],
            "preprocess": manifest["preprocess"],
            "elements": sorted(stats["elements"]),
            "trained_on": str(Path(data).resolve()), "data": identity["data"],
            "split": {k: split[k] for k in ("method", "seed")},
            "init": str(init) if init else None, "kinds": kinds}
    if rank == 0:
        write_resolved(config, out)
    task = PropertyTask(model, fcfg.loss, device, out / "best", meta)
    if fcfg.curvature_weighting.enabled:
        from finetune.weighting import CurvatureWeighting

        callbacks = (*callbacks, CurvatureWeighting(fcfg.curvature_weighting, train_set, fcfg.loss, tcfg.seed))
    trainer = Trainer(model, task, train_set, val_set, tcfg, out, param_groups=groups, rank=rank,
                      world_size=world_size, device=device, callbacks=callbacks)
    result = trainer.fit()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result


def warn_unstable_painn(model_cfg: ModelConfig, lr: float) -> bool:
    """Log a warning, and return True, when the model's 3D encoder is a PaiNN without
    ``block_norm`` and ``lr`` exceeds :data:`PLAIN_PAINN_MAX_LR` (the crystal ``auto`` lr does)."""
    enc = model_cfg.encoder3d
    if enc is None or enc.name != "painn" or enc.block_norm or lr <= PLAIN_PAINN_MAX_LR:
        return False
    log.warning("PaiNN without block_norm at lr %g: its states diverged in 3 of 7 runs at lr 0.002 on MP crystals "
                "(bench/results/crystal_optim); set model.encoder3d.block_norm=true, or train.lr=%g", lr,
                PLAIN_PAINN_MAX_LR)
    return True


def _param_groups(model: PropertyModel, freeze: bool, encoder_lr: float | None, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: heads at ``lr``; encoders frozen, at ``encoder_lr``, or at ``lr``."""
    enc_params = [p for e in model.encoders() for p in e.parameters()]
    enc_ids = {id(p) for p in enc_params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids]
    if freeze:
        for p in enc_params:
            p.requires_grad_(False)
        return [{"params": head_params, "lr": lr}]
    return [{"params": head_params, "lr": lr}, {"params": enc_params, "lr": encoder_lr or lr}]
