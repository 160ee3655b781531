"""The softmax readout against a per-graph loop, its mean and max limits, intensivity and double backward."""
from __future__ import annotations

import torch

from pipeline.models.readout import SoftmaxReadout, graph_index, segment_softmax_pool


def _loop_pool(x: torch.Tensor, score: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Graph by graph, channel by channel, from the definition (float64)."""
    out, start = [], 0
    for n in counts:
        rows = []
        for c in range(x.shape[1]):
            w = torch.softmax(score[start:start + n, c].double(), dim=0)
            rows.append((w * x[start:start + n, c].double()).sum())
        out.append(torch.stack(rows))
        start += n
    return torch.stack(out)


def test_softmax_pool_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    counts = [1, 5, 3, 8]
    x, score = torch.randn(17, 6, generator=g), 30 * torch.randn(17, 6, generator=g)  # large scores: shift needed
    got = segment_softmax_pool(x, score, graph_index(torch.tensor(counts)), len(counts))
    torch.testing.assert_close(got.double(), _loop_pool(x, score, counts), rtol=1e-5, atol=1e-6)


def test_softmax_pool_limits_are_mean_and_max() -> None:
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([4, 2, 7])
    index = graph_index(counts)
    x = torch.randn(13, 3, generator=g)
    mean = torch.zeros(3, 3).index_add(0, index, x) / counts.unsqueeze(1)
    torch.testing.assert_close(segment_softmax_pool(x, torch.zeros_like(x), index, 3), mean)
    top = torch.stack([x[index == b].max(dim=0).values for b in range(3)])
    torch.testing.assert_close(segment_softmax_pool(x, 1e4 * x, index, 3), top)


def test_softmax_readout_is_intensive_and_twice_differentiable() -> None:
    torch.manual_seed(2)
    readout = SoftmaxReadout(4).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    one = readout(x, torch.tensor([5]))
    # the same atoms three times over (a 3x supercell): the same graph embedding
    torch.testing.assert_close(readout(x.repeat(3, 1), torch.tensor([15])), one)
    assert one.shape == (1, 8)
    torch.autograd.gradgradcheck(lambda t: readout(t, torch.tensor([2, 3])), (x,))
