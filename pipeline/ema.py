"""Exponential moving average of a model's weights (Polyak averaging), for evaluation and saving.

A run that is stopped by its time budget while its loss still falls (crystals at 20 minutes) ends
with weights that carry the noise of its last mini-batches; the average of the weights over the
last few hundred steps sits closer to the minimum the optimizer is circling. The trainer keeps
the average beside the live weights, swaps it into the model to validate and to write ``best/``,
and swaps the live weights back to go on training (:meth:`WeightAverage.swapped`).

The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so the average does not
remember the random initialisation for thousands of steps (the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=...)``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn


class WeightAverage:
    """Moving average of the floating-point parameters of ``model``.

    Args:
        model: the trained module (unwrapped; its parameters are read at each :meth:`update`).
        decay: the weight of the old average once warmed up, in [0, 1); 0.999 averages over about
            the last 1,000 steps.
    Buffers (normalisation statistics, tabulated element properties) are not averaged: they are
    either constants or, for running statistics, already averages.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.dtype.is_floating_point]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (ramped up over the first updates)."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """``average <- d * average + (1 - d) * weights``; call after each optimizer step."""
        torch._foreach_lerp_(self.average, self.params, 1.0 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            live = p.detach().clone()
            p.copy_(a)
            a.copy_(live)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the live ones come back after it,
        also when the block raises."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict[str, Any]:
        """The averaged tensors (in parameter order) and the update count, for ``last.pt`` (the decay
        is the resumed run's ``train.ema_decay``)."""
        return {"average": [a.clone() for a in self.average], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the saved average does not have the model's parameter shapes.
        """
        saved: list[Tensor] = state["average"]
        if len(saved) != len(self.average) or any(s.shape != a.shape for s, a in zip(saved, self.average)):
            raise ValueError("the saved weight average does not match the model's parameters")
        with torch.no_grad():
            for a, s in zip(self.average, saved):
                a.copy_(s)
        self.updates = int(state["updates"])
