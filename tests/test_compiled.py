"""``train.compile``: compiled PaiNN blocks against the plain ones on real MP crystals (outputs,
gradients, parameter names), and the refusals (no C++ compiler; curvature weighting)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import MolmatError
from pipeline import compiled
from pipeline.config import PaiNNConfig
from pipeline.graphs import collate
from pipeline.models import PaiNN

needs_compiler = pytest.mark.skipif(compiled.compiler_available() is None,
                                    reason="no C++ compiler for torch.compile's CPU code")


def _outputs_and_grads(net: PaiNN, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out, _ = net(batch)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@needs_compiler
def test_compiled_painn_matches_plain_on_batches_of_other_sizes(mp_records: list) -> None:
    """The compiled blocks give the plain model's embeddings and parameter gradients (the plain
    model is the reference) on two batches of different atom and edge counts (dynamic shapes),
    and compiling changes no parameter name."""
    torch.manual_seed(0)
    plain = PaiNN(PaiNNConfig(hidden=16, interactions=2, n_rbf=12, cutoff=8.0, block_norm=True, readout="softmax"))
    fast = copy.deepcopy(plain)
    assert compiled.compile_blocks(fast) == 4  # two message and two update blocks
    assert list(fast.state_dict()) == list(plain.state_dict())
    for batch in (collate(mp_records[:12]), collate(mp_records[12:20])):
        out_p, grads_p = _outputs_and_grads(plain, batch)
        out_c, grads_c = _outputs_and_grads(fast, batch)
        torch.testing.assert_close(out_c, out_p, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_p.keys()
        # fused kernels sum in another order: float32 rounding relative to the gradients' scale, not
        # to each element (the softmax readout's score bias has a gradient of zero up to rounding,
        # since a softmax ignores a common shift, and the two orders round it differently)
        scale = max(float(g.abs().max()) for g in grads_p.values())
        for k in grads_p:
            torch.testing.assert_close(grads_c[k], grads_p[k], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")


def test_compile_without_a_compiler_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a C++ compiler a model with compilable blocks is refused with what to do; a model
    without any needs none."""
    monkeypatch.setattr(compiled, "compiler_available", lambda: None)
    net = PaiNN(PaiNNConfig(hidden=8, interactions=1))
    with pytest.raises(MolmatError, match="C\\+\\+ compiler"):
        compiled.compile_blocks(net)
    assert compiled.compile_blocks(torch.nn.Linear(2, 2)) == 0  # nothing to compile: nothing needed


def test_compile_with_curvature_weighting_is_refused(mp_shards: Path, tmp_path: Path) -> None:
    """Curvature weighting differentiates twice, which compiled blocks cannot: refused up front."""
    from finetune.train import finetune
    from pipeline.config import load_config

    cfg = load_config(None, ["train.compile=true", "finetune.curvature_weighting.enabled=true",
                             "model.encoder2d=null", "model.encoder3d={name: painn, cutoff: 5.0}"])
    with pytest.raises(MolmatError, match="not twice differentiable"):
        finetune(mp_shards, tmp_path / "run", cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written
