"""Property model: the encoder slots (2D, 3D, or both) plus one MLP head per target.

Targets are learned in a transformed, normalised space and reported in physical units:

* ``log10`` targets (elastic moduli) are learned as log10 of the value (non-positive values are
  treated as missing);
* ``extensive`` targets (total energies) are learned per atom after subtracting fitted element
  references: ``t = (y - sum_i ref[Z_i]) / n_atoms``;
* ``composition_baseline`` targets (intensive, e.g. formation energy per atom) are learned after
  subtracting a fitted linear function of the element fractions, ``t = y - sum_Z x_Z ref[Z]``,
  so the network learns what composition alone does not explain;
* ``gated`` targets (band gaps: never negative, exactly zero for metals) get a second head, a
  classifier of ``y > 0``; the regressor learns the positive labels only, and the prediction is
  ``max(regressor, 0)`` where the classifier says positive and exactly 0 elsewhere;
* every target is then normalised with the training split's mean and std.

References, means and stds are buffers of the module, so they are saved with the weights and a
loaded model predicts in physical units with nothing else at hand. The model lives in
``pipeline`` (not in the fine-tuning stage) because every stage that reads a model directory
builds it: evaluation, prediction, embedding, curvature.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from pipeline import MolmatError
from pipeline.config import ModelConfig
from pipeline.featurize import MAX_Z
from pipeline.graphs import GraphBatch
from pipeline.models import build_encoder

DEFAULT_EXTENSIVE = ("U0_Ha", "U_Ha", "H_Ha", "G_Ha")
#: Name prefixes of targets gated by default (non-negative with exact zeros).
DEFAULT_GATED = ("band_gap",)
#: Name prefixes of targets learned on top of a composition baseline by default.
DEFAULT_BASELINE = ("formation_energy",)
#: Logit that stands for "no gate" in the gate columns of targets that are not gated.
_OPEN = 30.0
#: Which graph of a batch each encoder slot reads.
SLOT_VIEWS = {"encoder2d": "2d", "encoder3d": "3d"}


@dataclass
class TargetSpec:
    """One learned target: name and unit as in the shards, how it is transformed, its loss weight."""

    name: str
    unit: str
    transform: str = "none"      # "none" | "log10"
    extensive: bool = False
    weight: float = 1.0
    gated: bool = False          # y >= 0 with exact zeros: classifier of y > 0 times a regressor
    composition_baseline: bool = False  # learn y minus a fitted linear function of element fractions


def target_specs(targets: list[dict[str, str]], wanted: list[str] | None, log10: list[str] | None,
                 extensive: list[str] | None, weights: dict[str, float], gated: list[str] | None = None,
                 baseline: list[str] | None = None) -> list[TargetSpec]:
    """Target specs from the shard manifest's targets and the finetune config.

    A ``None`` list means the default by name: log10 for ``*_GPa``, extensive for QM9's total
    energies, gated for ``band_gap*``, a composition baseline for ``formation_energy*``.
    """
    units = {t["name"]: t["unit"] for t in targets}
    names = wanted or list(units)
    missing = [n for n in names if n not in units]
    if missing:
        raise MolmatError(f"target(s) {', '.join(missing)} are not in the shards; they hold {', '.join(units)}")
    log10 = log10 if log10 is not None else [n for n in names if n.endswith("_GPa")]
    extensive = extensive if extensive is not None else [n for n in names if n in DEFAULT_EXTENSIVE]
    gated = gated if gated is not None else [n for n in names if n.startswith(DEFAULT_GATED)]
    baseline = baseline if baseline is not None else [n for n in names if n.startswith(DEFAULT_BASELINE)]
    both = [n for n in names if n in extensive and n in baseline]
    if both:
        raise MolmatError(f"target(s) {', '.join(both)} cannot be both extensive and have a composition baseline")
    return [TargetSpec(n, units[n], "log10" if n in log10 else "none", n in extensive, float(weights.get(n, 1.0)),
                       n in gated, n in baseline) for n in names]


def labelled_mask(y: Any, mask: Any, is_log10: Any) -> Any:
    """Where a label can be learned: present, and positive for log10 targets.

    Works on numpy arrays and torch tensors alike (bool arrays broadcast over targets).

    Args:
        y: (B, T) labels in physical units. mask: (B, T) bool, label present.
        is_log10: (T,) bool, target learned as log10.
    Returns:
        (B, T) bool.
    """
    return mask & (~is_log10 | (y > 0))


def _mlp(d_in: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.SiLU()]
        if dropout:
            mods.append(nn.Dropout(dropout))
        d = hidden
    mods.append(nn.Linear(d, 1))
    return nn.Sequential(*mods)


class PropertyModel(nn.Module):
    """Encoder slots plus per-target heads with normalisation stored inside.

    Args:
        model_cfg: which encoders fill the 2D and 3D slots, and the head shape.
        targets: the learned targets.
    Shapes: ``forward(batch)`` returns normalised predictions (B, T).
    """

    def __init__(self, model_cfg: ModelConfig, targets: list[TargetSpec]) -> None:
        super().__init__()
        # fine-tuning resolves auto slots for its data; a config built without data in view gets
        # the molecule defaults (the only defaults before per-kind ones existed)
        model_cfg = model_cfg.resolve(["molecule"])
        self.model_cfg = model_cfg
        self.targets = targets
        self.encoder2d = build_encoder(model_cfg.encoder2d) if model_cfg.encoder2d is not None else None
        self.encoder3d = build_encoder(model_cfg.encoder3d) if model_cfg.encoder3d is not None else None
        d = sum(e.out_dim for e in self.encoders())
        heads = model_cfg.heads
        self.heads = nn.ModuleList(_mlp(d, heads.hidden, heads.layers, heads.dropout) for _ in targets)
        #: one classifier head per gated target, in target order
        self.gates = nn.ModuleList(_mlp(d, heads.hidden, heads.layers, heads.dropout) for s in targets if s.gated)
        t = len(targets)
        self.register_buffer("mean", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("std", torch.ones(t, dtype=torch.float64))
        self.register_buffer("element_ref", torch.zeros(t, MAX_Z + 1, dtype=torch.float64))
        self.register_buffer("is_log10", torch.tensor([s.transform == "log10" for s in targets], dtype=torch.bool))
        self.register_buffer("is_extensive", torch.tensor([s.extensive for s in targets], dtype=torch.bool))
        self.register_buffer("loss_weight", torch.tensor([s.weight for s in targets], dtype=torch.float32))
        # derived from the target specs (config.json), so not stored with the weights
        self.register_buffer("is_gated", torch.tensor([s.gated for s in targets], dtype=torch.bool), persistent=False)
        self.register_buffer("has_baseline", torch.tensor([s.composition_baseline for s in targets], dtype=torch.bool),
                             persistent=False)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PropertyModel":
        """A randomly initialised model from a model directory's ``config.json`` (current layout).

        Args:
            config: plain data with ``model`` (a :class:`ModelConfig` dump) and ``targets``
                (a list of :class:`TargetSpec` dicts).
        """
        return cls(ModelConfig.model_validate(config["model"]), [TargetSpec(**t) for t in config["targets"]])

    def views(self) -> list[str]:
        """The graph views (``"2d"``, ``"3d"``) the filled slots read."""
        return [SLOT_VIEWS[s] for s in ("encoder2d", "encoder3d") if getattr(self, s) is not None]

    def encoders(self) -> list[nn.Module]:
        """The encoder modules in use (for freezing or a separate learning rate)."""
        return [e for e in (self.encoder2d, self.encoder3d) if e is not None]

    def embed(self, batch: GraphBatch) -> torch.Tensor:
        """Pooled structure embedding (B, D)."""
        parts = []
        if self.encoder2d is not None:
            parts.append(self.encoder2d(batch)[0])
        if self.encoder3d is not None:
            if batch.g3d is None:
                raise MolmatError("this model uses the 3D encoder but the records have no coordinates")
            parts.append(self.encoder3d(batch)[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, batch: GraphBatch, gates: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised regression outputs (B, T) (for gated targets: of the positive part).

        With ``gates``, also the gate logits (B, T) from the same encoder pass (see :meth:`outputs`).
        """
        return self.outputs(batch) if gates else self.outputs(batch)[0]

    def outputs(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised regression outputs (B, T) and gate logits (B, T) from one encoder pass.

        The logit of a target without a gate is a large constant (gate open).
        """
        h = self.embed(batch)
        pred = torch.cat([head(h) for head in self.heads], dim=-1)
        logits = torch.full_like(pred, _OPEN)
        if len(self.gates):
            logits = logits.index_copy(1, torch.nonzero(self.is_gated).flatten(),
                                       torch.cat([gate(h) for gate in self.gates], dim=-1))
        return pred, logits

    def gate_labels(self, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What each gate learns: (B, T) float ``y > 0`` and (B, T) bool mask (labelled, gated columns)."""
        return (y > 0).float(), mask & self.is_gated

    # ----------------------------------------------------------------------------- transforms
    def _composition(self, batch: GraphBatch) -> torch.Tensor:
        """Element counts per graph (B, MAX_Z + 1), float64."""
        z = batch.z.clamp(0, MAX_Z)
        graph = torch.repeat_interleave(torch.arange(batch.num_graphs, device=z.device), batch.n_atoms)
        counts = torch.zeros(batch.num_graphs, MAX_Z + 1, dtype=torch.float64, device=z.device)
        counts.index_put_((graph, z), torch.ones_like(z, dtype=torch.float64), accumulate=True)
        return counts

    def _reference(self, comp: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        """Element-reference term (B, T): counts @ ref for extensive targets, fractions @ ref for baselines."""
        ref = comp @ self.element_ref.T
        return torch.where(self.has_baseline, ref / n_atoms.double().unsqueeze(-1), ref)

    def _learned(self, y: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor,
                 n_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical (B, T) -> learned space before normalisation, and the regression mask
        (labelled, positive for log10 targets, and positive for gated targets)."""
        y = y.double()
        ref = self._reference(comp, n_atoms)
        t = torch.where(self.is_extensive, (y - ref) / n_atoms.double().unsqueeze(-1), y)
        t = torch.where(self.has_baseline, y - ref, t)
        t = torch.where(self.is_log10, torch.log10(torch.where(y > 0, y, torch.ones_like(y))), t)
        return t, labelled_mask(y, mask, self.is_log10) & (~self.is_gated | (y > 0))

    def normalize(self, y: torch.Tensor, mask: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical targets (B, T) -> normalised learned space (B, T) float32, with the effective mask."""
        t, mask = self._learned(y, mask, self._composition(batch), batch.n_atoms)
        return ((t - self.mean) / self.std).float(), mask

    def to_physical(self, pred: torch.Tensor, batch: GraphBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised predictions (B, T) (and gate logits (B, T)) -> physical units (B, T) float64.

        Gated targets are ``max(y, 0)`` where the logit is positive and 0 where it is not
        (without logits: ``max(y, 0)``).
        """
        t = pred.double() * self.std + self.mean
        ref = self._reference(self._composition(batch), batch.n_atoms)
        y = torch.where(self.is_extensive, t * batch.n_atoms.double().unsqueeze(-1) + ref, t)
        y = torch.where(self.has_baseline, t + ref, y)
        y = torch.where(self.is_log10, torch.pow(10.0, t), y)
        gate = logits > 0 if logits is not None else torch.ones_like(self.is_gated)
        return torch.where(self.is_gated, torch.where(gate, y.clamp_min(0.0), torch.zeros_like(y)), y)

    @torch.no_grad()
    def predict(self, batch: GraphBatch) -> torch.Tensor:
        """Predictions in physical units (B, T) float64."""
        pred, logits = self.outputs(batch)
        return self.to_physical(pred, batch, logits)

    @torch.no_grad()
    def fit_normalization(self, batches: Iterable[GraphBatch]) -> None:
        """Fit element references (extensive targets, least squares) and mean/std on training batches."""
        comps, ys, masks, sizes = [], [], [], []
        for b in batches:
            comps.append(self._composition(b).cpu())
            ys.append(b.y.double().cpu())
            masks.append(b.mask.cpu())
            sizes.append(b.n_atoms.cpu())
        comp, y, mask, n_atoms = torch.cat(comps), torch.cat(ys), torch.cat(masks), torch.cat(sizes)
        for j, spec in enumerate(self.targets):
            rows = mask[:, j]
            if (spec.extensive or spec.composition_baseline) and rows.any():
                # extensive: y ~ counts @ ref; baseline: y ~ fractions @ ref (least squares)
                x = comp[rows] if spec.extensive else comp[rows] / n_atoms[rows].double().unsqueeze(-1)
                used = x.sum(0) > 0
                coef, *_ = np.linalg.lstsq(x[:, used].numpy(), y[rows, j].numpy(), rcond=None)
                self.element_ref[j, used] = torch.from_numpy(coef).to(self.element_ref)
        t, mask = self._learned(y, mask, comp, n_atoms)
        for j in range(len(self.targets)):
            v = t[mask[:, j], j]
            if v.numel() >= 2:
                self.mean[j] = v.mean()
                self.std[j] = v.std().clamp_min(1e-8)
            elif v.numel() == 1:
                self.mean[j] = v[0]

    def describe(self) -> list[dict[str, Any]]:
        """Target specs as plain data (for config.json)."""
        return [asdict(s) for s in self.targets]
