"""Typed schema of ``config.yaml``, loading, ``--set a.b=value`` overrides, resolved copies.

Every section forbids unknown keys, so a typo is an error naming the key instead of a silently
ignored setting. Values given with ``--set`` are parsed as YAML scalars/lists (``--set
train.lr=3e-4``, ``--set finetune.targets=[gap_Ha,homo_Ha]``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import MolmatError

log = logging.getLogger("molmat.config")


class _Section(BaseModel):
    """Base of every config section: unknown keys and wrong types are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    """One readable line per problem, naming the dotted key."""
    lines = []
    errors = exc.errors()
    # a slot that may be "auto" or an encoder config: when the value is a mapping, the "auto"
    # alternative's complaint says nothing useful; and union members are named by the encoder
    if any("literal['auto']" not in map(str, e["loc"]) for e in errors):
        errors = [e for e in errors if "literal['auto']" not in map(str, e["loc"])]
    for err in errors:
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("tagged-union["))
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"invalid config ({origin}): " + "; ".join(lines)



class MoleculeFeaturization(_Section):
    """How molecules become graphs."""

    cutoff: float = Field(5.0, gt=0, description="radius (Angstrom) of the 3D neighbour graph")
    conformers: int = Field(0, ge=0, description="extra RDKit ETKDG conformers per molecule")
    embed_smiles: bool = Field(True, description="generate 3D coordinates (ETKDG) for SMILES input")
    seed: int = 0


class CrystalFeaturization(_Section):
    """How crystals become periodic neighbour graphs."""

    cutoff: float = Field(8.0, gt=0, description="neighbour cutoff radius (Angstrom)")
    max_neighbors: int = Field(12, ge=1, description="keep the nearest N neighbours of each atom")
    tie_tolerance: float = Field(1e-3, ge=0, description="also keep neighbours within this distance (Angstrom) of "
                                 "the N-th, so a coordination shell is never cut (0 = strict cut)")
    min_volume_per_atom: float = Field(1.0, gt=0, description="reject cells with less volume per atom (Angstrom^3; "
                                       "real solids have 5 or more) before the neighbour search, whose cost grows "
                                       "with the inverse of it")


class PreprocessConfig(_Section):
    """The ``preprocess`` stage: raw files to LMDB shards."""

    format: str = Field("auto", description="input format name or 'auto' (detected from file names)")
    targets: list[str] | None = Field(None, description="label columns to keep (default: all declared)")
    units: dict[str, str] = Field(default_factory=dict, description="unit per target, overrides the source's")
    shard_size: int = Field(10000, ge=1)
    workers: int = Field(2, ge=0, description="featurisation processes; 0 = in the main process")
    chunk_size: int = Field(64, ge=1, description="records per task sent to a worker")
    min_distance: float = Field(0.5, gt=0, description="reject structures with two atoms closer than this "
                                "(Angstrom; periodic images included); H2's bond is 0.74")
    molecule: MoleculeFeaturization = Field(default_factory=MoleculeFeaturization)
    crystal: CrystalFeaturization = Field(default_factory=CrystalFeaturization)


class SplitConfig(_Section):
    """Deterministic train/val/test split written next to the shards."""

    method: Literal["random", "scaffold"] = "random"
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _train_is_left(self) -> "SplitConfig":
        if self.val + self.test >= 1:
            raise ValueError(f"split.val + split.test must be below 1 (got {self.val} + {self.test}); the rest is "
                             "the train split")
        return self


class SourceSpec(_Section):
    """One dataset that ``molmat run`` preprocesses."""

    name: str
    sources: list[str]
    format: str = "auto"
    labels: str | None = None
    targets: list[str] | None = None


#: The stages ``molmat run`` knows, in the order it runs them.
RUN_STAGES = ("preprocess", "pretrain", "finetune", "evaluate")


class RunConfig(_Section):
    """The ``run`` command: every stage in order on the configured datasets."""

    out: str = "runs/sample"
    datasets: list[SourceSpec] = Field(default_factory=list)
    stages: list[Literal["preprocess", "pretrain", "finetune", "evaluate"]] = Field(
        default_factory=lambda: list(RUN_STAGES), description="stages to run (always in the order of RUN_STAGES); "
        "with pretrain, every dataset is fine-tuned from the pretrained encoder and, for comparison, from scratch")
    pretrain_minutes: float = Field(0.5, gt=0, description="pretraining budget (all datasets together) in `molmat run`")
    finetune_minutes: float = Field(0.5, gt=0, description="training budget per dataset and arm in `molmat run`")

    @model_validator(mode="after")
    def _unique(self) -> "RunConfig":
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"run.stages lists a stage twice: {self.stages}")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"run.datasets has two datasets with the same name: {names}")
        return self


#: A setting with this value is taken from its per-kind table by the kind of the data
#: (``model.auto``, ``train.by_kind``, ``finetune.loss_by_kind``).
AUTO = "auto"


def auto_kind(kinds: list[str]) -> str:
    """Which per-kind default (``model.auto``, ``train.by_kind``, ``finetune.loss_by_kind``) data of
    these record kinds gets: ``crystal`` for crystals only, ``molecule`` for molecules and for data
    that mix both."""
    return "crystal" if list(kinds) == ["crystal"] else "molecule"


class KindTraining(_Section):
    """The learning rate and batch size ``auto`` gives one kind of data."""

    lr: float = Field(gt=0, description="AdamW learning rate")
    batch_size: int = Field(ge=1, description="structures per step and process")


class TrainByKind(_Section):
    """What ``train.lr: auto`` and ``train.batch_size: auto`` give each kind of data.

    Molecules get 1e-3 and 64. Crystals get 2e-3 and 32, measured with their default encoder,
    PaiNN with ``block_norm`` (bench/results/crystal_block_norm, 20-minute budget): MP band gap
    0.300 against 0.321 eV and formation energy 0.063 against 0.072 eV/atom for 1e-3 and 64, log10
    G 0.082 against 0.084 (K 0.044 against 0.042). The plain PaiNN blocks diverged in 3 of 7 runs at
    these values (states compounding through the blocks until the final LayerNorm overflowed),
    so a crystal model with ``block_norm: false`` should set ``train.lr: 0.001``. One config
    still gives each kind its own values (``molmat run`` fine-tunes molecules and crystals from
    one config).
    """

    molecule: KindTraining = Field(default_factory=lambda: KindTraining(lr=1e-3, batch_size=64))
    crystal: KindTraining = Field(default_factory=lambda: KindTraining(lr=2e-3, batch_size=32))


class TrainConfig(_Section):
    """Optimisation settings shared by every training stage."""

    epochs: int = Field(100, ge=1)
    batch_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        AUTO, description="per process (the effective batch is this times the world size), or auto (train.by_kind)")
    lr: Union[Annotated[float, Field(gt=0)], Literal["auto"]] = Field(
        AUTO, description="AdamW learning rate, or auto (train.by_kind for the data's kind)")
    by_kind: TrainByKind = Field(default_factory=TrainByKind,
                                 description="the lr and batch size `auto` gives each kind of data (measured)")
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps (at most a tenth of the run)")
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=1)
    clip_grad: float | None = Field(10.0, description="max gradient norm; null disables clipping")
    patience: int | None = Field(30, description="early stopping: epochs without validation improvement")
    max_minutes: float | None = Field(None, description="wall-clock budget; training stops cleanly after it, and the "
                                      "cosine schedule is fitted to the steps the budget allows")
    log_every: int = Field(50, ge=1, description="steps between log lines")
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process; null keeps torch's default "
                                "(all cores; torchrun sets 1). On a shared machine 1 avoids stalls on descheduled threads")
    tensorboard: bool = False
    compile: bool = Field(False, description="compile the 3D encoders' message and update blocks with torch.compile "
                          "(pipeline.compiled; needs a C++ compiler; the first steps pay the compilation)")
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="validate and save an exponential moving average of the weights with this decay "
        "(0.999: about the last 1,000 steps); null = the weights as they are")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale lr with the effective batch (batch_size x processes) over reference_batch_size: "
        "none, linear (SGD) or square root (adaptive optimisers such as AdamW)")
    reference_batch_size: int | None = Field(
        None, ge=1, description="the batch size train.lr was tuned for; null = batch_size (only the number of "
        "processes scales lr)")

    def is_resolved(self) -> bool:
        """True when neither ``lr`` nor ``batch_size`` is ``auto``."""
        return AUTO not in (self.lr, self.batch_size)

    def resolve(self, kinds: list[str]) -> "TrainConfig":
        """This config with ``auto`` ``lr`` and ``batch_size`` taken from ``by_kind`` for the data's
        kinds (:func:`auto_kind`); values the user set are kept."""
        preset = getattr(self.by_kind, auto_kind(kinds))
        return self.model_copy(update={k: getattr(preset, k) for k in ("lr", "batch_size") if getattr(self, k) == AUTO})


# Encoder hyper-parameters are defined here rather than beside the models so that config.yaml is
# validated as a whole (unknown encoder keys included) without importing torch and dgl, which
# would cost every preprocessing run and worker 2 s and 450 MiB. Adding an encoder: its config
# class here (with a `name` literal and its `view`), one entry in `EncoderConfig` below, its
# module and one entry in `pipeline.models.ENCODERS`, and its defaults in config.yaml.
class _EncoderSection(_Section):
    """Base of every encoder config: ``name`` picks the encoder, ``view`` is the graph it reads.

    ``view`` is ``"2d"`` (``GraphBatch.g2d``: bonds, or a crystal's neighbour topology without
    distances) or ``"3d"`` (``GraphBatch.g3d``: positions, cell and image offsets); it decides
    which slot (``model.encoder2d`` or ``model.encoder3d``) the encoder may fill and which
    featurisation settings a model that uses it depends on.
    """

    view: ClassVar[str] = "2d"


class MPNNConfig(_EncoderSection):
    """Hyper-parameters of :class:`MPNN` (unknown keys are rejected)."""

    view: ClassVar[str] = "2d"
    name: Literal["mpnn"] = "mpnn"
    hidden: int = Field(64, ge=1, description="node state width d")
    steps: int = Field(3, ge=1, description="message-passing steps T (weights shared across steps)")
    message: Literal["edge_network", "pair", "ggnn"] = "edge_network"
    readout: Literal["set2set", "sum", "mean"] = "set2set"
    set2set_iters: int = Field(3, ge=1, description="processing steps of the set2set readout")
    master_node: bool = Field(False, description="add a per-graph master state exchanged with every atom each step")
    virtual_edges: bool = Field(False, description="connect every unbonded pair of atoms with a 'virtual' edge")
    towers: int = Field(1, ge=1, description="split the state into towers, each with its own message function")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the aggregated messages")
    crystal_shells: bool = Field(True, description="crystal neighbour edges say which coordination shell "
                                 "(1st, 2nd, 3rd+) a neighbour is in; false: all neighbour edges alike")

    @model_validator(mode="after")
    def _towers_divide_hidden(self) -> "MPNNConfig":
        if self.hidden % self.towers:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by towers ({self.towers})")
        return self


class SchNetConfig(_EncoderSection):
    """Hyper-parameters of :class:`SchNet` (unknown keys are rejected)."""

    view: ClassVar[str] = "3d"
    name: Literal["schnet"] = "schnet"
    hidden: int = Field(64, ge=1, description="atom state and filter width")
    interactions: int = Field(3, ge=1, description="number of interaction blocks")
    n_rbf: int = Field(50, ge=2, description="Gaussians in the distance expansion")
    cutoff: float = Field(5.0, gt=0, description="model cutoff (Angstrom); must not exceed the shard's cutoff")
    readout: Literal["mean", "sum"] = "mean"


class PaiNNConfig(_EncoderSection):
    """Hyper-parameters of :class:`PaiNN` (unknown keys are rejected)."""

    view: ClassVar[str] = "3d"
    name: Literal["painn"] = "painn"
    hidden: int = Field(64, ge=1, description="width of the scalar and of each vector channel")
    interactions: int = Field(3, ge=1, description="number of message + update blocks")
    n_rbf: int = Field(20, ge=2, description="sine radial basis functions sin(n pi d / cutoff) / d")
    cutoff: float = Field(5.0, gt=0, description="model cutoff (Angstrom); must not exceed the shard's cutoff")
    readout: Literal["mean", "sum", "softmax"] = Field(
        "mean", description="graph embedding: mean or sum of the atom scalars, or softmax: the mean next to a "
        "learned per-channel softmax-weighted average (2 x hidden wide, intensive; pipeline.models.readout)")
    block_norm: bool = Field(False, description="normalise each block's input states (LayerNorm on scalars, RMS "
                                                "over channels on vectors) so that no state compounds through the "
                                                "blocks: stable at learning rates where the plain blocks overflow")
    element_descriptors: bool = Field(False, description="add a learned projection of tabulated element properties "
                                      "(pipeline/data/element_descriptors.csv: period, group, electronegativity, "
                                      "valence electrons, ...) to each atom's learned embedding")


#: Any encoder's config, told apart by ``name`` (a discriminated union: plain imports, no registry).
EncoderConfig = Annotated[Union[MPNNConfig, SchNetConfig, PaiNNConfig], Field(discriminator="name")]


class HeadsConfig(_Section):
    """Shape of the per-target MLP heads on the pooled embedding."""

    hidden: int = Field(128, ge=1, description="hidden width of each head")
    layers: int = Field(2, ge=1, description="linear layers per head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout between head layers")


#: The encoder a slot gets when a config fills it without naming one.
_SLOT_DEFAULTS = {"encoder2d": "mpnn", "encoder3d": "schnet"}


class SlotDefaults(_Section):
    """What the two encoder slots hold for one kind of data when they are ``auto``."""

    encoder2d: Optional[EncoderConfig] = None
    encoder3d: Optional[EncoderConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        return _name_slots(data)


def _name_slots(data: Any) -> Any:
    # `--set model.encoder3d.cutoff=6` on an empty slot names no encoder; each slot has a default.
    if isinstance(data, dict):
        data = dict(data)
        for slot, name in _SLOT_DEFAULTS.items():
            if isinstance(data.get(slot), dict) and "name" not in data[slot]:
                data[slot] = {**data[slot], "name": name}
    return data


class AutoSlotsConfig(_Section):
    """Per-kind defaults of the encoder slots (measured: bench/results/crystal_encoders.md; for
    PaiNN's ``block_norm`` bench/results/crystal_block_norm; for its ``element_descriptors`` and
    softmax readout bench/results/crystal_elements)."""

    molecule: SlotDefaults = Field(default_factory=lambda: SlotDefaults(encoder2d=MPNNConfig()),
                                   description="molecules, and datasets that mix molecules and crystals")
    crystal: SlotDefaults = Field(
        default_factory=lambda: SlotDefaults(encoder3d=PaiNNConfig(cutoff=8.0, block_norm=True, element_descriptors=True,
                                                                  readout="softmax")),
        description="datasets of crystals only")


class ModelConfig(_Section):
    """The property model: a 2D encoder slot, a 3D encoder slot (either may be null), and heads.

    With both slots filled the two graph embeddings are concatenated before the heads.
    """

    encoder2d: Union[Literal["auto"], EncoderConfig, None] = Field(
        AUTO, description="encoder of the 2D graph, null, or auto (model.auto by data kind)")
    encoder3d: Union[Literal["auto"], EncoderConfig, None] = Field(
        AUTO, description="encoder of the 3D graph, null, or auto (model.auto by data kind)")
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    auto: AutoSlotsConfig = Field(default_factory=AutoSlotsConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        return _name_slots(data)

    @model_validator(mode="after")
    def _slots_fit(self) -> "ModelConfig":
        if self.encoder2d is None and self.encoder3d is None:
            raise ValueError("model.encoder2d and model.encoder3d are both null; a model needs at least one encoder")
        for slot, view in (("encoder2d", "2d"), ("encoder3d", "3d")):
            encs = [getattr(self, slot), getattr(self.auto.molecule, slot), getattr(self.auto.crystal, slot)]
            for where, enc in zip((f"model.{slot}", f"model.auto.molecule.{slot}", f"model.auto.crystal.{slot}"), encs):
                if enc is not None and enc != AUTO and enc.view != view:
                    raise ValueError(f"{where} needs an encoder of the {view} graph; '{enc.name}' reads the "
                                     f"{enc.view} graph (put it in model.encoder{enc.view})")
        return self

    def is_resolved(self) -> bool:
        """True when no slot is ``auto``."""
        return AUTO not in (self.encoder2d, self.encoder3d)

    def resolve(self, kinds: list[str]) -> "ModelConfig":
        """This config with each ``auto`` slot taken from ``model.auto`` for the data's kinds.

        Args:
            kinds: record kinds of the data (``dataset_kinds``); crystals only -> ``auto.crystal``,
                anything else (molecules, or a mix) -> ``auto.molecule``.
        Raises:
            MolmatError: both slots end up null.
        """
        if self.is_resolved():
            return self
        preset = getattr(self.auto, auto_kind(kinds))
        data = self.model_dump(mode="json")
        for slot in ("encoder2d", "encoder3d"):
            if data[slot] == AUTO:
                enc = getattr(preset, slot)
                data[slot] = enc.model_dump(mode="json") if enc is not None else None
        try:
            return ModelConfig.model_validate(data)
        except ValidationError as exc:
            raise MolmatError(_format_validation_error(exc, f"model (auto slots for {'/'.join(kinds)} data)")) from None

    def slots(self) -> dict[str, _EncoderSection]:
        """The filled slots, ``{"encoder2d": cfg, "encoder3d": cfg}`` minus the null ones.

        Raises:
            MolmatError: a slot is still ``auto`` (resolve it first).
        """
        if not self.is_resolved():
            raise MolmatError("model slots set to 'auto' must be resolved for the data first (ModelConfig.resolve)")
        return {s: c for s, c in (("encoder2d", self.encoder2d), ("encoder3d", self.encoder3d)) if c is not None}


class CurvatureWeightingConfig(_Section):
    """Curvature-informed multi-task loss weights (New et al. 2022), re-estimated during fine-tuning."""

    enabled: bool = Field(False, description="re-weight the per-target losses by their Hessian curvature")
    every: int = Field(5, ge=1, description="epochs between re-estimates (after the validation pass)")
    statistic: Literal["top", "trace"] = Field("top", description="top Hessian eigenvalue (Lanczos) or trace "
                                               "(Hutchinson) of each target's loss")
    iters: int = Field(10, ge=1, description="Lanczos steps (top) or Rademacher probes (trace) per target")
    batches: int = Field(2, ge=1, description="fixed training batches the curvature is measured on")
    batch_size: int = Field(64, ge=1, description="structures per batch of that fixed set")
    power: float = Field(0.5, ge=0, description="weight proportional to statistic^(-power); 0 = equal weights")
    min_weight: float = Field(0.1, gt=0, description="weights are normalised to mean 1, then clipped to "
                              "[min_weight, max_weight]")
    max_weight: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "CurvatureWeightingConfig":
        if self.min_weight > self.max_weight:
            raise ValueError(f"curvature_weighting.min_weight ({self.min_weight}) exceeds max_weight "
                             f"({self.max_weight})")
        return self


class LossByKind(_Section):
    """The training loss ``finetune.loss: auto`` gives each kind of data.

    Crystals: the mean absolute error, the metric reported, lowered MP band gap, formation energy
    and log10 moduli against the squared error at the same budget (bench/results/crystal_l1).
    Molecules keep the squared error their benchmarks were measured with.
    """

    molecule: Literal["mse", "l1", "huber"] = "mse"
    crystal: Literal["mse", "l1", "huber"] = "l1"


class FinetuneConfig(_Section):
    """Property heads and how targets are learned."""

    targets: list[str] | None = Field(None, description="targets to learn; default: every target in the shards")
    log10_targets: list[str] | None = Field(None, description="learned as log10; default: names ending in _GPa")
    extensive_targets: list[str] | None = Field(
        None, description="learned per atom with fitted element references; default: QM9 U0/U/H/G")
    gated_targets: list[str] | None = Field(
        None, description="non-negative targets with exact zeros (band gaps): a classifier of y > 0 times a "
                          "regressor of the positive values; default: names starting with band_gap")
    composition_baseline_targets: list[str] | None = Field(
        None, description="intensive targets learned on top of a fitted linear function of the element "
                          "fractions; default: names starting with formation_energy")
    loss_weights: dict[str, float] = Field(default_factory=dict)
    loss: Literal["auto", "mse", "l1", "huber"] = Field(
        AUTO, description="training loss of each target: mse, l1, huber, or auto (finetune.loss_by_kind by data kind)")
    loss_by_kind: LossByKind = Field(default_factory=lambda: LossByKind(),
                                     description="the loss `auto` gives each kind of data (measured)")
    max_train: int | None = Field(None, ge=1, description="use a seeded subset of this many training records "
                                                          "(label-scarce experiments); val and test are unchanged")
    init: str | None = Field(None, description="encoder directory (molmat pretrain) or a fine-tuned property model whose encoders start this run (transfer learning)")
    freeze_encoder: bool = False
    encoder_lr: float | None = Field(None, gt=0, description="own learning rate for a pretrained encoder")
    curvature_weighting: CurvatureWeightingConfig = Field(default_factory=CurvatureWeightingConfig)

    def resolved_loss(self, kinds: list[str]) -> str:
        """The training loss for data of these record kinds: ``loss``, or when it is ``auto`` the
        entry of ``loss_by_kind`` for the kind (:func:`auto_kind`)."""
        return getattr(self.loss_by_kind, auto_kind(kinds)) if self.loss == AUTO else self.loss


class PretrainConfig(_Section):
    """3D Infomax: contrastive alignment of the 2D MPNN with the 3D encoder."""

    temperature: float = Field(0.1, gt=0, description="NT-Xent temperature")
    proj_dim: int = Field(64, ge=1, description="projection head output width")
    proj_hidden: int = Field(128, ge=1)
    use_conformers: bool = Field(True, description="stored extra conformers are extra positive 3D views")
    encoder3d: EncoderConfig = Field(default_factory=SchNetConfig,
                                     description="the 3D encoder that model.encoder2d is aligned with")

    @model_validator(mode="after")
    def _partner_is_3d(self) -> "PretrainConfig":
        if self.encoder3d.view != "3d":
            raise ValueError(f"pretrain.encoder3d must read the 3D graph; '{self.encoder3d.name}' reads the "
                             f"{self.encoder3d.view} graph")
        return self


class DensityLabelsConfig(_Section):
    """``molmat density-labels``: DFT electron densities on uniform grids with PySCF (molmat[density])."""

    functional: str = Field("PBE", min_length=1, description="exchange-correlation functional (PySCF name)")
    basis: str = Field("def2-SVP", min_length=1, description="AO basis set (PySCF name)")
    density_fit: bool = Field(True, description="density fitting of the Coulomb term (faster; see README)")
    auxbasis: str | None = Field(None, description="fitting basis; null = PySCF's default for the basis "
                                 "(def2-universal-jfit for def2 bases and pure functionals)")
    grid_level: int = Field(1, ge=0, le=9, description="PySCF XC integration grid level (0 coarse .. 9 fine; "
                            "PySCF's default is 3; 1 changes the density by <0.001% NMAE, see README)")
    conv_tol: float = Field(1e-7, gt=0, lt=1, description="SCF energy convergence threshold (Hartree)")
    max_cycle: int = Field(100, ge=1, description="SCF iterations before a molecule counts as not converged")
    charge: int = Field(0, description="total charge of every molecule")
    spin: int | None = Field(None, ge=0, description="2S (unpaired electrons); null = 0 for even electron counts "
                             "(RKS) and 1 for odd ones (UKS doublet); any non-zero spin uses UKS")
    spacing: float = Field(0.25, gt=0, description="uniform grid step (bohr)")
    margin: float = Field(4.0, ge=0, description="box margin around the atoms on every side (bohr)")
    chunk_points: int = Field(20000, ge=100, description="grid points evaluated at once (bounds memory)")
    save_density_matrix: bool = Field(True, description="also write OUT/<id>.dm.npz, the AO density matrix "
                                      "(exact density anywhere, same layout as the shared reference set)")
    workers: int = Field(0, ge=0, description="processes, one molecule each; 0 = one per available core (at most "
                         "limit)")
    threads: int = Field(0, ge=0, description="threads per process (PySCF OpenMP, BLAS); 0 = the available cores "
                         "shared out among the workers, at least 1")
    start: int = Field(0, ge=0, description="skip the first K input records")
    limit: int | None = Field(None, ge=1, description="label at most N records (after start); null = all")
    crystals: bool = Field(False, description="also label crystals, with PySCF's periodic DFT (GTH "
                           "pseudopotentials: valence density, written as <id>.CHGCAR over the cell); off: "
                           "crystals are recorded as failures")
    crystal_basis: str = Field("gth-dzvp", min_length=1, description="crystals: AO basis (PySCF name, for GTH "
                               "pseudopotentials)")
    pseudo: str = Field("gth-pbe", min_length=1, description="crystals: pseudopotential family (PySCF name)")
    kmesh: list[int] = Field([2, 2, 2], min_length=3, max_length=3, description="crystals: Monkhorst-Pack "
                             "k-point mesh (Gamma-centred)")
    smearing: float = Field(0.0, ge=0, description="crystals: Fermi-Dirac smearing width (Hartree) for metals; "
                            "0 = none (an odd electron count then fails with a reason)")
    max_cell_atoms: int = Field(8, ge=1, description="crystals: larger cells are recorded as failures (periodic "
                                "DFT cost grows steeply; Si, 2 atoms, takes ~1 minute on one core)")

    @model_validator(mode="after")
    def _kmesh_positive(self) -> "DensityLabelsConfig":
        if any(k < 1 for k in self.kmesh):
            raise ValueError(f"density_labels.kmesh must be 3 positive integers, got {self.kmesh}")
        return self


class CurvatureConfig(_Section):
    """``molmat curvature``: Hessian spectra of each target's loss on a fixed set of structures."""

    batches: int = Field(8, ge=1, description="fixed batches the losses are summed over")
    batch_size: int = Field(128, ge=1, description="structures per batch (batches x batch_size, seeded pick)")
    top_k: int = Field(5, ge=1, description="top Hessian eigenvalues per target (Lanczos)")
    lanczos_iters: int = Field(20, ge=1, description="Lanczos steps for the top eigenvalues (the run is also the "
                               "first density start and deflates the trace)")
    trace_probes: int = Field(10, ge=1, description="Rademacher probes of the trace, Hutchinson on the complement "
                              "of the Lanczos subspace (its trace is exact)")
    slq_starts: int = Field(2, ge=1, description="start vectors of stochastic Lanczos quadrature (density), the "
                            "top-eigenvalue run included")
    slq_iters: int = Field(20, ge=1, description="Lanczos steps per further start of the density")
    sigma: float = Field(0.01, gt=0, description="Gaussian broadening of the density, relative to the spectral range")
    float64: bool = Field(False, description="analyse in float64 (model and batch converted); float32 is ~2x "
                          "faster on CPUs, and its double-backprop HVPs keep ~1e-7 of the float64 product (tested)")
    hvp: Literal["auto", "autograd", "fd"] = Field(
        "auto", description="Hessian-vector products: auto (double backprop unless it disagrees with finite "
        "differences by 1e-4), autograd or fd")
    params: Literal["all", "encoder", "heads"] = Field("all", description="parameters the Hessian is taken over")
    max_minutes: float | None = Field(None, gt=0, description="stop after the target running when this is "
                                      "reached; what was measured is written, marked incomplete")
    seed: int = Field(0, description="seeds the structure pick and every random vector (the same for each target)")


class DensityConfig(_Section):
    """The electron-density model (DeepDFT-style probes), trained by ``molmat finetune`` on density shards."""

    # 64 wide, measured: at the same 85-minute one-thread budget on 698 QM9 cubes PaiNN 64 took 3x the
    # steps of PaiNN 128 and reached test NMAE 0.460% against 0.547%, and predicts 3-4x faster
    encoder: EncoderConfig = Field(default_factory=lambda: PaiNNConfig(hidden=64),
                                   description="3D encoder giving the atom states (painn or schnet)")
    init: str | None = Field(None, description="pretrained encoder directory (molmat pretrain) whose 3D encoder "
                             "initialises density.encoder (it brings its architecture)")
    probe_layers: int = Field(3, ge=1, description="interaction layers in which probes receive messages from atoms")
    probe_n_rbf: int = Field(20, ge=2, description="Gaussians in the probe-atom distance expansion")
    cutoff: float = Field(4.0, gt=0, description="probe-atom cutoff (Angstrom) of the learned messages")
    baseline: Literal["none", "promolecule"] = Field(
        "promolecule", description="promolecule: predict the free-atom superposition plus a learned correction "
        "(total densities only); none: the network predicts the density itself (softplus)")
    promolecule_table: str | None = Field(None, description="free-atom table (.npz of python -m pipeline.promolecule); "
                                          "null = the shipped PBE/def2-SVP table of H, C, N, O, F")
    probes_uniform: int = Field(500, ge=0, description="training probes per structure drawn uniformly from its grid")
    probes_near_atoms: int = Field(500, ge=0, description="training probes per structure near atoms (Gaussian "
                                   "offsets of near_sigma, snapped to the grid)")
    near_sigma: float = Field(0.5, ge=0, description="offset standard deviation of near-atom probes (Angstrom)")
    val_probes: int = Field(2000, ge=1, description="uniform probes per validation structure, the same every epoch "
                            "(molmat evaluate uses the full grid)")
    batch_size: int = Field(8, ge=1, description="structures per step and process; replaces train.batch_size "
                            "for density runs")
    # 1024, measured: a training step of 8 QM9 molecules x 1000 probes (PaiNN 128) took 1.65 s on one
    # thread at 1024 and 512, 2.9-5.8 s at 8192, whose (3, E, F) edge tensors of ~80 MB each are
    # fresh mmap'd pages on every elementwise op; a chunk's tensors at 1024 stay in the heap and cache.
    probe_chunk: int = Field(1024, ge=1, description="probes evaluated at once (bounds memory of full-grid "
                             "evaluation, and keeps the edge tensors cache-sized; a training batch's probes "
                             "are kept for the backward pass)")
    predict_chunk: int = Field(256, ge=1, description="probes evaluated at once without gradients (evaluate, "
                               "predict): smaller than probe_chunk since the tabulated filters' gathered rows must "
                               "stay in cache (PaiNN 128: 42 us per probe at 256, 63 at 1024, one thread)")
    grid_stride: int = Field(2, ge=1, description="whole grids (molmat predict cubes, molmat evaluate): evaluate the "
                             "network on every grid_stride-th point per axis and interpolate log density (cubic "
                             "splines), except near atoms; 1 = every point (measured on QM9: 2 changes NMAE by "
                             "0.02% at 3.7x the speed)")
    max_coarse_step: float | None = Field(
        0.4, gt=0, description="whole grids: the stride is lowered until the coarse step is at most this "
        "(Angstrom), so a stride tuned on 0.25 bohr grids does not interpolate across 0.75 A on a 0.25 A grid; "
        "null = no limit")
    direct_radius_hydrogen: float | None = Field(
        None, ge=0, description="the same for hydrogen atoms; null = direct_radius (measured with qm9-density-fast "
        "at stride 3 on 10 test molecules: 0.6 A moves NMAE by +0.028 points with 25% fewer network points, 0.4 A "
        "+0.066, 0 +0.24)")
    direct_radius: float = Field(1.0, ge=0, description="with grid_stride > 1, grid points within this distance "
                                 "(Angstrom) of an atom are evaluated directly (the nuclear cusps)")
    loss: Literal["l1", "mse"] = Field("l1", description="training loss on probe densities (e/bohr^3)")
    eval_slices: int = Field(2, ge=0, description="structures molmat evaluate draws a density slice of")

    @model_validator(mode="after")
    def _checks(self) -> "DensityConfig":
        if self.encoder.view != "3d":
            raise ValueError(f"density.encoder must read the 3D graph; '{self.encoder.name}' reads the "
                             f"{self.encoder.view} graph (use painn or schnet)")
        if self.probes_uniform + self.probes_near_atoms < 1:
            raise ValueError("density.probes_uniform + density.probes_near_atoms must be at least 1")
        return self


class Config(_Section):
    """The whole configuration; one section per stage."""

    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    density_labels: DensityLabelsConfig = Field(default_factory=DensityLabelsConfig)
    curvature: CurvatureConfig = Field(default_factory=CurvatureConfig)
    density: DensityConfig = Field(default_factory=DensityConfig)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def _parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in item:
        raise MolmatError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise MolmatError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise MolmatError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override applied.

    Setting an encoder's ``name`` to another encoder starts that section from the new encoder's
    defaults (the old encoder's settings would be unknown keys).
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None or child == AUTO:
                # setting a key inside an empty or auto slot starts it from its encoder's defaults
                child = node[part] = {}
            if not isinstance(child, dict):
                raise MolmatError(f"--set {item!r}: '{part}' is not a section")
            node = child
        if path[-1] == "name" and node.get("name") not in (None, value):
            # `--set model.encoder3d.name=other` switches encoders: the old one's settings do not apply
            node.clear()
        node[path[-1]] = value
    return data


_LEGACY_HEAD_KEYS = {"head_hidden": "hidden", "head_layers": "layers", "dropout": "dropout"}
_LEGACY_KINDS = {"mpnn": (True, False), "schnet": (False, True), "both": (True, True)}


def _merge_encoder(current: Any, name: str, old: dict[str, Any]) -> dict[str, Any]:
    """``old`` settings on top of the slot's current config when it holds the same encoder."""
    base = dict(current) if isinstance(current, dict) and current.get("name", name) == name else {}
    return {**base, **old, "name": name}


def upgrade_model_section(model: dict[str, Any], finetune: dict[str, Any] | None = None,
                          pretrain: dict[str, Any] | None = None) -> list[str]:
    """Translate the model layout of molmat <= 0.1 in place; returns what was translated.

    Before encoder slots a config said ``model.encoder: mpnn|schnet|both`` with the settings of
    both encoders in ``model.mpnn`` and ``model.schnet`` (the SchNet settings also configured
    pretraining's 3D encoder), and the heads in ``finetune.head_hidden/head_layers/dropout``.
    Users' config files, ``--set`` overrides in job scripts and saved model directories carry
    that layout, so it is translated, not refused:

    * ``model.encoder`` fills or empties the slots (``both`` fills both);
    * ``model.mpnn.*`` goes to ``model.encoder2d`` (an MPNN), ``model.schnet.*`` to
      ``model.encoder3d`` when that slot is in use, and always to ``pretrain.encoder3d``;
    * ``finetune.head_*`` and ``finetune.dropout`` go to ``model.heads``.

    Args:
        model: the ``model`` section as plain data (changed in place).
        finetune, pretrain: the ``finetune`` and ``pretrain`` sections, if any (changed in place).
    Returns:
        One line per translated key, empty when the layout is already current.
    Raises:
        MolmatError: an old key with a value that cannot be translated.
    """
    notes: list[str] = []
    if any(k in model for k in ("encoder", "mpnn", "schnet")):
        kind = model.pop("encoder", None)
        old = {}
        for name in ("mpnn", "schnet"):
            value = model.pop(name, None) or {}
            if not isinstance(value, dict):
                raise MolmatError(f"model.{name} must be a mapping of {name} settings, not {value!r}")
            old[name] = {k: v for k, v in value.items() if k != "name"}
        if kind is not None and kind not in _LEGACY_KINDS:
            raise MolmatError(f"model.encoder (deprecated) must be mpnn, schnet or both, not {kind!r}")
        if kind is None:
            # 0.1's default was model.encoder: mpnn; auto slots take that meaning in an old layout
            if model.get("encoder2d") == AUTO:
                model["encoder2d"] = {"name": "mpnn"}
            if model.get("encoder3d") == AUTO:
                model["encoder3d"] = None
            use2d = model.get("encoder2d", "default") is not None
            use3d = model.get("encoder3d") is not None
        else:
            use2d, use3d = _LEGACY_KINDS[kind]
            notes.append(f"model.encoder={kind} -> model.encoder2d: {'mpnn' if use2d else 'null'}, "
                         f"model.encoder3d: {'schnet' if use3d else 'null'}")
        for slot, name, use in (("encoder2d", "mpnn", use2d), ("encoder3d", "schnet", use3d)):
            if not use:
                model[slot] = None
            elif kind is not None or old[name]:
                current = model.get(slot) if slot in model else ({"name": "mpnn"} if slot == "encoder2d" else None)
                model[slot] = _merge_encoder(current, name, old[name])
        if old["mpnn"]:
            notes.append(f"model.mpnn.{{{','.join(old['mpnn'])}}} -> model.encoder2d")
        if old["schnet"]:
            if pretrain is not None:
                pretrain["encoder3d"] = _merge_encoder(pretrain.get("encoder3d"), "schnet", old["schnet"])
            notes.append(f"model.schnet.{{{','.join(old['schnet'])}}} -> pretrain.encoder3d"
                         + (" and model.encoder3d" if use3d else ""))
    if finetune is not None and any(k in finetune for k in _LEGACY_HEAD_KEYS):
        heads = model.setdefault("heads", {})
        for old_key, new_key in _LEGACY_HEAD_KEYS.items():
            if old_key in finetune:
                heads[new_key] = finetune.pop(old_key)
                notes.append(f"finetune.{old_key} -> model.heads.{new_key}")
    return notes


def upgrade_legacy(data: dict[str, Any], origin: str = "config") -> dict[str, Any]:
    """A copy of a whole config's plain data with the molmat <= 0.1 layout translated.

    Logs one deprecation line naming each translated key (see :func:`upgrade_model_section`).
    """
    data = json.loads(json.dumps(data or {}))
    model = data.get("model")
    has_old_heads = isinstance(data.get("finetune"), dict) and any(k in data["finetune"] for k in _LEGACY_HEAD_KEYS)
    if not isinstance(model, dict) and not has_old_heads:
        return data
    if not isinstance(model, dict):
        model = data["model"] = {}
    pretrain = data.setdefault("pretrain", {}) if isinstance(data.get("pretrain", {}), dict) else None
    finetune = data.get("finetune") if isinstance(data.get("finetune"), dict) else None
    notes = upgrade_model_section(model, finetune, pretrain)
    if pretrain == {}:
        data.pop("pretrain")
    if notes:
        log.warning("%s uses deprecated config keys, translated: %s. Update it to the model.encoder2d / "
                    "model.encoder3d / model.heads layout (see config.yaml).", origin, "; ".join(notes))
    return data


def config_from_dict(data: dict[str, Any], origin: str = "config") -> Config:
    """Validate plain data into a :class:`Config` (old layouts translated), raising MolmatError naming bad keys."""
    data = upgrade_legacy(data, origin)
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        raise MolmatError(_format_validation_error(exc, origin)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (the project's ``config.yaml`` by default) and apply overrides.

    Args:
        path: YAML file; None means the default config shipped with molmat.
        overrides: ``a.b=value`` strings applied in order after loading.
    Returns:
        The validated configuration.
    Raises:
        MolmatError: missing file, invalid YAML, unknown key or wrong type.
    """
    cfg_path = Path(path) if path else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            data = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MolmatError(f"{cfg_path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise MolmatError(f"{cfg_path}: expected a mapping of sections at the top level")
    elif path:
        raise MolmatError(f"config file {cfg_path} does not exist")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, origin=str(cfg_path) + (" with --set overrides" if overrides else ""))


def write_resolved(config: Config, out_dir: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config into an output directory and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    try:
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        tmp.replace(target)
    except BaseException:  # a full disk: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    return target
