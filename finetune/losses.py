"""Per-target training losses of a multi-target model, and their weighted total.

One loss per target (a (T,) tensor) is what curvature analysis needs (one Hessian per task) and
what multi-task weighting acts on; the training loss is their weighted mean over the targets
labelled in the batch.
"""
from __future__ import annotations

import torch


def task_losses(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the labelled entries of each target.

    Args:
        pred, target: (B, T) normalised values.
        mask: (B, T) bool, True where labelled.
        kind: ``mse``, ``l1`` or ``huber`` (delta 1 in normalised units).
    Returns:
        (losses (T,), labelled counts (T,)); a target without a label in the batch has loss 0.
    """
    if kind == "mse":
        per = (pred - target) ** 2
    elif kind == "l1":
        per = (pred - target).abs()
    elif kind == "huber":
        per = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {kind!r}; expected mse, l1 or huber")
    per = torch.where(mask, per, torch.zeros_like(per))
    count = mask.sum(0)
    return per.sum(0) / count.clamp_min(1), count


def gate_losses(logits: torch.Tensor, positive: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean binary cross-entropy of each target's gate over its labelled entries.

    Args:
        logits: (B, T) gate logits. positive: (B, T) float, 1 where the label is > 0.
        mask: (B, T) bool, True where the target is gated and labelled.
    Returns:
        (losses (T,), counts (T,)); 0 for targets without a gate or a label in the batch.
    """
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    per = torch.where(mask, per, torch.zeros_like(per))
    count = mask.sum(0)
    return per.sum(0) / count.clamp_min(1), count


def weighted_total(losses: torch.Tensor, count: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-target losses over the targets labelled in the batch.

    Args:
        losses: (T,) per-target losses. count: (T,) labelled entries per target.
        weight: (T,) loss weight per target.
    Returns:
        Scalar; targets without any label in the batch contribute nothing.
    """
    w = weight * (count > 0)
    return (losses * w).sum() / w.sum().clamp_min(1e-12)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                kind: str = "mse") -> torch.Tensor:
    """Weighted mean over targets of the per-target mean loss over labelled entries (scalar).

    Shapes as in :func:`task_losses`; ``weight`` (T,).
    """
    losses, count = task_losses(pred, target, mask, kind)
    return weighted_total(losses, count, weight)


def property_losses(model: torch.nn.Module, raw: torch.nn.Module, batch, kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target training losses of a property model on one batch: what training minimises
    (weighted) and what curvature analysis differentiates, one per target.

    A gated target's loss is its regressor's (positive labels) plus its gate's cross-entropy.

    Args:
        model: the model to call (a DDP wrapper during distributed training, so gradients sync).
        raw: the plain :class:`pipeline.models.property.PropertyModel` (its normalisation).
        batch: a :class:`pipeline.graphs.GraphBatch` with ``y`` (B, T) and ``mask`` (B, T).
        kind: ``mse``, ``l1`` or ``huber``.
    Returns:
        (losses (T,), labelled counts (T,)).
    """
    target, mask = raw.normalize(batch.y, batch.mask, batch)
    pred, logits = model(batch, gates=True)
    losses, count = task_losses(pred, target.to(pred.dtype), mask, kind)
    positive, gate_mask = raw.gate_labels(batch.y, batch.mask)
    gate, gate_count = gate_losses(logits, positive.to(logits.dtype), gate_mask)
    return losses + gate, torch.maximum(count, gate_count)

