"""Hessian numerics (pipeline.curvature) against independent references, and on molmat's real models.

References: a small float64 tanh MLP whose full Hessian is built column by column from central
differences of its gradient (first derivatives only) and by ``torch.autograd.functional.hessian``;
dense eigendecompositions; exact traces and spectral moments; sampled GOE and Poisson levels.
On the real models (MPNN, SchNet, both, on shipped QM9 and MP records) double backprop through
DGL's sparse kernels is compared with finite differences of the gradient.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline import curvature as C

# ----------------------------------------------------------------------- the small network
N_IN, N_HIDDEN, N_OUT, N_DATA = 4, 7, 2, 24  # 4*7 + 7 + 7*2 + 2 = 51 parameters


def _mlp_problem(dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], C.LossFn]:
    """Parameters and MSE loss closure of a 2-layer tanh MLP on fixed random data."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(N_DATA, N_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N_DATA, N_OUT, generator=gen, dtype=torch.float64)
    # weights of scale ~1 keep tanh out of its linear regime: a non-convex point, so the
    # Hessian has eigenvalues of both signs (needed by the negative-mass test)
    shapes = [(N_HIDDEN, N_IN), (N_HIDDEN,), (N_OUT, N_HIDDEN), (N_OUT,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    x, y = x.to(dtype), y.to(dtype)

    def loss() -> torch.Tensor:
        w1, b1, w2, b2 = params
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return params, loss


def _hessian_by_gradient_differences(params: list[torch.Tensor], loss: C.LossFn, h: float = 1e-5) -> torch.Tensor:
    """(n, n) Hessian from central differences of the gradient along each unit vector, symmetrised.

    Written here from first derivatives only, sharing no code with pipeline.curvature.
    """
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    n = flat0.numel()

    def grad_at(flat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            start = 0
            for p in params:
                p.copy_(flat[start:start + p.numel()].view_as(p))
                start += p.numel()
        g = torch.autograd.grad(loss(), params)
        return torch.cat([gi.reshape(-1) for gi in g])

    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=flat0.dtype)
        e[j] = h
        cols.append((grad_at(flat0 + e) - grad_at(flat0 - e)) / (2 * h))
    grad_at(flat0)
    hess = torch.stack(cols, dim=1)
    return 0.5 * (hess + hess.T)


def _hessian_functional(params: list[torch.Tensor]) -> torch.Tensor:
    """(n, n) Hessian of the loss as a function of the flat parameter vector (torch.autograd.functional)."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(
        lambda flat: _mlp_loss_from([c.view(s) for c, s in zip(flat.split(sizes), shapes)]), flat0)


def _mlp_loss_from(parts: list[torch.Tensor]) -> torch.Tensor:
    """The loss of :func:`_mlp_problem` as a function of explicit weights (same data)."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(N_DATA, N_IN, generator=gen, dtype=torch.float64)
    y = torch.randn(N_DATA, N_OUT, generator=gen, dtype=torch.float64)
    w1, b1, w2, b2 = parts
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


@pytest.fixture(scope="module")
def mlp() -> tuple[list[torch.Tensor], C.LossFn, torch.Tensor]:
    """The float64 MLP problem and its reference Hessian (finite differences of the gradient)."""
    params, loss = _mlp_problem()
    return params, loss, _hessian_by_gradient_differences(params, loss)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _unit(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).to(dtype)


# -------------------------------------------------------------------------- flat helpers
def test_flatten_unflatten_round_trip_and_shape_check():
    ts = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.zeros(2, 1, 2)]
    flat = C.flatten(ts)
    assert flat.shape == (C.num_params(ts),) == (11,)
    back = C.unflatten(flat, ts)
    assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(back, ts))
    with pytest.raises(ValueError, match="does not match"):
        C.unflatten(torch.zeros(10), ts)


# ----------------------------------------------------------------------- HVPs on the MLP
def test_reference_hessians_agree(mlp):
    params, loss, hess = mlp
    assert hess.shape == (51, 51)
    assert float(_mlp_loss_from([p.detach() for p in params])) == float(loss())
    exact = _hessian_functional(params)
    assert _rel(hess, exact) < 1e-8
    # a non-convex point: both signs present (the negative-mass test relies on it)
    lam = torch.linalg.eigvalsh(hess)
    assert lam.min() < -1e-3 and lam.max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hvps_match_the_reference_hessian_in_float64(mlp, seed):
    params, loss, hess = mlp
    v = _unit(51, seed)
    before = [p.detach().clone() for p in params]
    assert _rel(C.hvp_double_backprop(loss, params, v), hess @ v) < 1e-6
    assert _rel(C.hvp_finite_difference(loss, params, v), hess @ v) < 1e-6
    # parameters restored bit for bit (copied back, not stepped back)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_hvps_in_float32_within_float32_accuracy(mlp):
    _, _, hess = mlp
    params, loss = _mlp_problem(torch.float32)
    v = _unit(51, 0, torch.float32)
    ad = C.hvp_double_backprop(loss, params, v)
    fd = C.hvp_finite_difference(loss, params, v)
    assert ad.dtype == fd.dtype == torch.float32
    ref = hess @ v.double()
    # the float32 problem is the float64 one rounded: AD is good to a few u ~ 1e-6; FD with the
    # float32 step (c = 4.9e-4) to ~1e-4 on the real models (below), 1e-3 leaves room
    assert _rel(ad.double(), ref) < 1e-5
    assert _rel(fd.double(), ref) < 1e-3
    # the step constant is cbrt(u) in float64 and cbrt(u) / 10 in float32: 2 ** (29 / 3) / 10 ~ 81 apart
    w = C.flatten(params)
    assert C.default_fd_eps(w, v) / C.default_fd_eps(w.double(), v.double()) == pytest.approx(2 ** (29 / 3) / 10, rel=1e-3)


def test_unused_parameters_give_zero_rows(mlp):
    params, loss, hess = mlp
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    v = torch.cat([_unit(51, 3), torch.ones(3, dtype=torch.float64)])
    for hv in (C.hvp_double_backprop(loss, params + [unused], v), C.hvp_finite_difference(loss, params + [unused], v)):
        assert torch.equal(hv[51:], torch.zeros(3, dtype=torch.float64))
        assert _rel(hv[:51], hess @ v[:51]) < 1e-6


def test_parameters_restored_when_the_loss_raises(mlp):
    params, loss, _ = mlp
    before = [p.detach().clone() for p in params]
    calls = []

    def flaky() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # fails at w - eps v, after w + eps v was set
            raise RuntimeError("boom")
        return loss()

    with pytest.raises(RuntimeError, match="boom"):
        C.hvp_finite_difference(flaky, params, _unit(51, 0))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_hvp_operator(mlp):
    params, loss, hess = mlp
    v = _unit(51, 4)
    for method in ("autograd", "fd"):
        op = C.HVPOperator(loss, params, method=method, float64=True)
        assert (op.n, op.dtype, op.device) == (51, torch.float64, params[0].device)
        assert _rel(op(v), hess @ v) < 1e-6
        assert _rel(op(-v), -(hess @ v)) < 1e-6
        assert op.calls == 2
    with pytest.raises(ValueError, match="model.double"):
        params32, loss32 = _mlp_problem(torch.float32)
        C.HVPOperator(loss32, params32, float64=True)
    with pytest.raises(ValueError, match="unknown HVP method"):
        C.HVPOperator(loss, params, method="exact")
    with pytest.raises(ValueError, match="requires_grad"):
        C.HVPOperator(loss, [torch.zeros(2)])


def test_check_hvp_on_the_mlp(mlp):
    params, loss, _ = mlp
    report = C.check_hvp(loss, params, n_vectors=3, seed=0)
    assert len(report["rel_errors"]) == 3 and report["error"] is None
    assert report["max_rel_error"] < 1e-6
    assert max(report["fd_self_errors"]) < 1e-6


class _DetachedSquare(torch.autograd.Function):
    """x**2 whose backward is computed outside autograd: first derivatives right, second ones lost."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (2.0 * x * grad).detach()


def test_check_hvp_detects_a_backward_that_is_not_differentiable(mlp):
    params, loss, _ = mlp

    def broken() -> torch.Tensor:
        return loss() + _DetachedSquare.apply(params[0]).sum()

    report = C.check_hvp(broken, params, n_vectors=2)
    assert report["max_rel_error"] > 1e-2 and report["max_rel_error_extrapolated"] > 1e-2


def test_extrapolated_differences_remove_the_step_error(mlp):
    """With a step far too large, plain central differences disagree with double backprop by
    O(eps^2); the Richardson combination of eps and eps/4 removes that term."""
    params, loss, _ = mlp
    report = C.check_hvp(loss, params, n_vectors=2, seed=3, eps=0.05)
    assert report["max_rel_error"] > 1e-4
    assert report["max_rel_error_extrapolated"] < report["max_rel_error"] / 30


def test_dgl_kernels_whose_double_backprop_is_wrong_are_caught():
    """DGL 2.1 on the CPU: segment max (``readout_nodes(op="max")``) and ``edge_softmax`` have
    backward passes written with raw kernels (``_bwd_segment_cmp``, ``_edge_softmax_backward``),
    so double backprop silently drops their second-order terms; sums (GSpMM/GSDDMM, segment sum)
    are differentiable. molmat's models use neither of the two (Set2Set's ``softmax_nodes`` uses
    segment max only as a shift, whose gradient is identically zero, so nothing is lost there;
    the real-model tests below confirm it). If a model ever adds them, ``check_hvp`` says so.
    """
    import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
    import dgl
    from dgl.nn.functional import edge_softmax

    # in-degrees 2 and 1, so max and softmax are not trivial
    g = dgl.batch([dgl.graph(([0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1])), dgl.graph(([0, 1, 2, 2], [1, 0, 0, 1]))])
    x = torch.randn(g.num_nodes(), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)

    def readout(op: str) -> C.LossFn:
        def loss() -> torch.Tensor:
            with g.local_scope():
                g.ndata["h"] = torch.tanh(x @ w)
                return (dgl.readout_nodes(g, "h", op=op) ** 2).sum()
        return loss

    def attention() -> torch.Tensor:
        h = torch.tanh(x @ w)
        return (dgl.ops.u_mul_e_sum(g, h, edge_softmax(g, dgl.ops.u_dot_v(g, h, h))) ** 2).sum()

    def node_softmax() -> torch.Tensor:
        h = torch.tanh(x @ w)
        with g.local_scope():
            g.ndata["s"] = h[:, :1]
            return (dgl.softmax_nodes(g, "s") ** 2 * h).sum()

    for fine in (readout("sum"), readout("mean"), node_softmax):
        assert C.check_hvp(fine, [w])["max_rel_error"] < 1e-6
    for wrong in (readout("max"), attention):
        report = C.check_hvp(wrong, [w])
        assert max(report["fd_self_errors"]) < 1e-6       # the finite differences are consistent
        assert report["max_rel_error"] > 1e-2              # double backprop is not


# ------------------------------------------------------------------------------- Lanczos
def test_lanczos_top_eigenpairs_match_eigh(mlp):
    params, loss, hess = mlp
    lam, vec = torch.linalg.eigh(hess)
    lam, vec = lam.flip(0), vec.flip(1)
    op = C.HVPOperator(loss, params)
    res = C.lanczos(op, k=5, iters=35, seed=0)
    assert res.iterations == 35 and res.eigenvalues.shape == (5,) and res.eigenvectors.shape == (5, 51)
    assert op.calls == 35 + 5  # iterations plus one product per true residual
    assert torch.allclose(res.eigenvalues, lam[:5], rtol=1e-4, atol=0)
    scale = float(lam.abs().max())
    assert float(res.residuals.max()) < 1e-6 * scale
    # the Lanczos estimate |beta_m s_m| is the true residual in exact arithmetic
    assert torch.allclose(res.residual_estimates, res.residuals, atol=1e-8 * scale)
    cos = (res.eigenvectors @ vec[:, :5]).diagonal().abs()
    assert float((1 - cos).max()) < 1e-6


def test_lanczos_with_n_iterations_recovers_the_whole_spectrum(mlp):
    params, loss, hess = mlp
    lam = torch.linalg.eigvalsh(hess).flip(0)
    res = C.lanczos(C.HVPOperator(loss, params), k=51, iters=51, seed=1, residuals=False)
    assert res.iterations == 51 and res.residuals is None
    assert float((res.eigenvalues - lam).abs().max()) < 1e-8 * float(lam.abs().max())


def test_lanczos_breakdown_continues_and_keeps_multiplicities():
    # 3 distinct eigenvalues: a Krylov space from any start is invariant after 3 steps
    lam = torch.tensor([3.0, 2.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    op = C.DenseOperator(q @ torch.diag(lam) @ q.T)
    res = C.lanczos(op, k=6, iters=6, seed=0)
    assert res.breakdowns >= 1 and res.iterations == 6
    assert torch.allclose(res.eigenvalues, lam, atol=1e-12)
    assert float(res.residuals.max()) < 1e-12
    early = C.slq_density(op, iters=6, starts=1)
    assert float(early[1][0, 3:].sum()) == 0.0  # steps after the breakdown are padding


def test_lanczos_float32(mlp):
    _, _, hess = mlp
    params, loss = _mlp_problem(torch.float32)
    res = C.lanczos(C.HVPOperator(loss, params), k=2, iters=35)
    assert res.eigenvectors.dtype == torch.float32
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(hess).flip(0)[:2], rtol=1e-4, atol=0)


# --------------------------------------------------------------------- trace and density
def test_hutchinson_trace_within_three_standard_errors(mlp):
    params, loss, hess = mlp
    op = C.HVPOperator(loss, params)
    mean, stderr, samples = C.hutchinson_trace(op, probes=200, seed=0)
    assert len(samples) == 200 and op.calls == 200
    assert abs(mean - float(hess.trace())) < 3 * stderr
    # the estimator's standard deviation is known exactly: 2 * sum_{i != j} H_ij^2 for Rademacher
    sd = math.sqrt(2 * float((hess ** 2).sum() - (hess.diagonal() ** 2).sum()))
    assert 0.7 * sd / math.sqrt(200) < stderr < 1.3 * sd / math.sqrt(200)
    assert C.hutchinson_trace(C.DenseOperator(hess), probes=200, seed=0)[0] == pytest.approx(mean, rel=1e-9)


def _outlier_matrix(n: int = 300, seed: int = 0) -> torch.Tensor:
    """(n, n) symmetric matrix shaped like a network Hessian: five outliers over a bulk near zero."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.cat([torch.tensor([100.0, 80.0, 60.0, 40.0, 20.0], dtype=torch.float64),
                     0.5 * torch.randn(n - 5, generator=gen, dtype=torch.float64)])
    return (q * eig) @ q.T


def test_deflated_trace_is_unbiased_and_beats_plain_hutchinson():
    h = _outlier_matrix()
    op = C.DenseOperator(h)
    lz = C.lanczos(op, k=5, iters=12, seed=1, residuals=False)
    assert torch.allclose(lz.basis @ lz.basis.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(lz.basis @ h @ lz.basis.T, lz.tridiagonal, atol=1e-9)
    mean, stderr, samples = C.deflated_trace(op, lz.basis, lz.tridiagonal, probes=200, seed=5)
    assert len(samples) == 200
    exact = float(h.trace())
    assert abs(mean - exact) < 3 * stderr
    # the deflated term is Hutchinson on A = (I - P) H (I - P): its sd is known exactly
    proj = torch.eye(300, dtype=torch.float64) - lz.basis.T @ lz.basis
    a = proj @ h @ proj
    sd = math.sqrt(2 * float((a ** 2).sum() - (a.diagonal() ** 2).sum()))
    assert 0.7 * sd / math.sqrt(200) < stderr < 1.3 * sd / math.sqrt(200)
    plain_sd = math.sqrt(2 * float((h ** 2).sum() - (h.diagonal() ** 2).sum()))
    assert sd < plain_sd / 5  # the outliers carried most of plain Hutchinson's variance


def test_quadrature_of_a_rademacher_lanczos_run_is_an_slq_start():
    h = _outlier_matrix(seed=3)
    op = C.DenseOperator(h)
    start = C.rademacher_start(300, 7, torch.zeros(0, dtype=torch.float64))
    assert set(start.unique().tolist()) == {-1.0, 1.0}
    lz = C.lanczos(op, k=3, iters=15, residuals=False, v0=start)
    nodes, weights = C.quadrature(lz.tridiagonal)
    ref_nodes, ref_weights = C.slq_density(op, iters=15, starts=1, seed=7)
    assert torch.allclose(nodes, ref_nodes[0], rtol=1e-9, atol=1e-9)
    assert torch.allclose(weights, ref_weights[0], rtol=1e-7, atol=1e-10)
    v = start / start.norm()
    for p in (1, 2, 3):  # Gauss quadrature: sum w theta^p = v^T H^p v exactly for p < 2 m
        assert float((weights * nodes ** p).sum()) == pytest.approx(float(v @ torch.linalg.matrix_power(h, p) @ v),
                                                                     rel=1e-9)


def _quadratic_form_sd(a: torch.Tensor, starts: int) -> float:
    """Standard deviation of the mean over ``starts`` of ``v^T A v``, v = z / sqrt(n), z Rademacher."""
    n = a.shape[0]
    return math.sqrt(2 * float((a ** 2).sum() - (a.diagonal() ** 2).sum())) / n / math.sqrt(starts)


def test_slq_moments_and_density(mlp):
    params, loss, hess = mlp
    n, iters, starts = 51, 15, 40
    nodes, weights = C.slq_density(C.HVPOperator(loss, params), iters=iters, starts=starts, seed=0)
    assert nodes.shape == weights.shape == (starts, iters)
    assert torch.allclose(weights.sum(dim=1), torch.ones(starts, dtype=torch.float64), atol=1e-12)
    moments = C.spectral_moments(nodes, weights, [0, 1, 2])
    assert float(moments[0]) == pytest.approx(1.0, abs=1e-12)
    # Gauss quadrature with 15 nodes is exact for degree < 30, so each start gives v^T H^p v up
    # to rounding: the only error is the sampling error of the starts, known exactly. 4 sd.
    for p in (1, 2):
        exact = float(torch.linalg.matrix_power(hess, p).trace()) / n
        sd = _quadratic_form_sd(torch.linalg.matrix_power(hess, p), starts)
        assert abs(float(moments[p]) - exact) < 4 * sd + 1e-10
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma = 0.02 * (hi - lo)
    grid = torch.linspace(lo - 8 * sigma, hi + 8 * sigma, 4001, dtype=torch.float64)
    density = C.broadened_density(nodes, weights, grid, sigma)
    assert density.shape == (4001,) and bool((density >= 0).all())
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(density * grid, grid)) == pytest.approx(float(moments[1]), abs=1e-6)


def test_negative_mass_matches_the_negative_eigenvalue_fraction(mlp):
    params, loss, hess = mlp
    lam, vec = torch.linalg.eigh(hess)
    starts = 30
    # with iters = n each start's quadrature is the exact spectral measure of v, so the estimate
    # is the mean of v^T P v (P: projector on the negative eigenvectors): sampling error only
    nodes, weights = C.slq_density(C.HVPOperator(loss, params), iters=51, starts=starts, seed=2)
    neg = vec[:, lam < 0]
    exact = neg.shape[1] / 51
    assert 0 < exact < 1
    assert abs(C.negative_mass(nodes, weights) - exact) < 4 * _quadratic_form_sd(neg @ neg.T, starts)


# ------------------------------------------------------------------------ level spacing
def test_level_spacing_ratio_goe_and_poisson():
    assert C.POISSON_MEAN_R == pytest.approx(0.3863, abs=1e-4)
    gen = torch.Generator().manual_seed(0)
    goe = []
    for _ in range(3):  # 3 x 398 ratios: standard error of <r> ~ 0.26 / sqrt(1194) ~ 0.008
        a = torch.randn(400, 400, generator=gen, dtype=torch.float64)
        goe.append(C.level_spacing_ratio(torch.linalg.eigvalsh(a + a.T)))
    poisson = C.level_spacing_ratio(torch.rand(1200, generator=gen, dtype=torch.float64))
    assert sum(goe) / 3 == pytest.approx(C.GOE_MEAN_R, abs=0.025)
    assert poisson == pytest.approx(C.POISSON_MEAN_R, abs=0.025)
    assert C.level_spacing_ratio([0.0, 1.0, 3.0]) == pytest.approx(0.5)
    assert C.level_spacing_ratio([3.0, 0.0, 1.0, 1.0]) == pytest.approx(0.0)  # one zero spacing


def test_time_hvp_vs_grad(mlp):
    params, loss, _ = mlp
    t = C.time_hvp_vs_grad(loss, params, repeats=2)
    assert t["autograd_error"] is None and t["n"] == 51
    assert all(t[k] > 0 and math.isfinite(t[k]) for k in ("grad_s", "hvp_autograd_s", "hvp_fd_s", "ratio_autograd"))


# ---------------------------------------------------------------------- the real models
TINY_2D = {"name": "mpnn", "hidden": 8, "steps": 2, "set2set_iters": 2}
TINY_3D = {"name": "schnet", "hidden": 8, "interactions": 2, "n_rbf": 8}
PATHS = {"mpnn qm9": ("qm9", TINY_2D, None), "schnet mp": ("mp", None, TINY_3D),
         "both qm9": ("qm9", TINY_2D, TINY_3D), "both mp": ("mp", TINY_2D, TINY_3D)}


def _to_float64(batch):
    """Cast a collated batch's float tensors to float64 (the helper ``molmat curvature`` uses)."""
    from finetune.curvature import batch_to_dtype

    batch_to_dtype(batch, torch.float64)
    return batch


def _float_dtypes(batch) -> set[torch.dtype]:
    found = {batch.cell.dtype, batch.y.dtype}
    for g in (batch.g2d, batch.g3d):
        if g is not None:
            found |= {d[k].dtype for d in (g.ndata, g.edata) for k in d.keys() if d[k].is_floating_point()}
    return found


def _real_problem(shards: Path, enc2d: dict | None, enc3d: dict | None, seed: int = 0,
                  dtype: torch.dtype = torch.float64, **mpnn_attrs):
    """A property model on 16 shipped records (float64 unless told), its loss closures and parameter groups.

    The same seed gives the same weights in either dtype (built in float32, then converted).
    """
    from finetune.losses import task_losses, weighted_total
    from pipeline.config import ModelConfig
    from pipeline.graphs import collate
    from pipeline.models.property import PropertyModel, target_specs
    from pipeline.shards import ShardDataset

    torch.manual_seed(seed)
    ds = ShardDataset(shards)
    batch = collate([ds[i] for i in range(16)])
    assert _float_dtypes(batch) == {torch.float32}
    cfg = ModelConfig.model_validate({"encoder2d": enc2d, "encoder3d": enc3d, "heads": {"hidden": 8}})
    model = PropertyModel(cfg, target_specs(ds.manifest["targets"], None, None, None, {}))
    for key, value in mpnn_attrs.items():
        setattr(model.encoder2d, key, value)
    model.fit_normalization([batch])
    model.eval()
    if dtype == torch.float64:
        model.double()
        batch = _to_float64(batch)
    assert _float_dtypes(batch) == {dtype}
    assert {p.dtype for p in model.parameters()} == {dtype}
    target, mask = model.normalize(batch.y, batch.mask, batch)
    target = target.to(dtype)  # normalize() returns float32 targets; a constant, so only rounding
    assert bool(mask[:, 0].any())

    def task0() -> torch.Tensor:
        return task_losses(model(batch), target, mask)[0][0]

    def total() -> torch.Tensor:
        losses, count = task_losses(model(batch), target, mask)
        return weighted_total(losses, count, model.loss_weight)

    groups = {"all": list(model.parameters()),
              "encoders": [p for e in model.encoders() for p in e.parameters()],
              "heads": list(model.heads.parameters()) + list(model.gates.parameters())}
    assert sum(len(v) for k, v in groups.items() if k != "all") == len(groups["all"])
    return model, {"task0": task0, "total": total}, groups


@pytest.mark.parametrize("path", list(PATHS))
def test_dgl_double_backprop_is_right_on_the_real_models(path, request):
    """Double backprop through DGL's kernels (MPNN: bipartite copy_u_sum, Set2Set's segment
    softmax/sum and LSTM; SchNet: u_mul_e + sum, readout) equals finite differences of the
    gradient, for every parameter group and for one task's loss and the weighted total.

    Measured (16 records, float64, default step): 2e-11 to 4e-8 relative, against the issue's
    1e-4; the finite differences at eps and eps / 4 agree as closely, and their difference
    shrinks as eps^2, so the agreement is not an artefact of a shared code path.
    """
    name, enc2d, enc3d = PATHS[path]
    shards = request.getfixturevalue(f"{name}_shards")
    _, losses, groups = _real_problem(shards, enc2d, enc3d)
    for group, params in groups.items():
        for loss_name, loss in losses.items():
            report = C.check_hvp(loss, params, n_vectors=2, seed=0)
            assert report["error"] is None
            assert max(report["fd_self_errors"]) < 1e-6, (group, loss_name, report)
            assert report["max_rel_error"] < 1e-4, (group, loss_name, report)
            assert min(report["hv_norms"]) > 1e-6  # a real, non-zero curvature was compared


@pytest.mark.parametrize("variant", [{"message": "pair"}, {"message": "ggnn"}, {"force_per_edge": True},
                                     {"master_node": True, "virtual_edges": True, "towers": 2, "readout": "mean"}],
                         ids=["pair", "ggnn", "per_edge", "master_virtual_towers_mean"])
def test_dgl_double_backprop_on_the_other_mpnn_kernels(variant, qm9_shards):
    """The other MPNN message paths: GSDDMM u_add_v + copy_e_sum (pair), typed copy_u_sum
    (ggnn), per-edge bmm + copy_e_sum, broadcast_nodes / readout sum / mean (master node,
    virtual edges)."""
    cfg = dict(TINY_2D, **{k: v for k, v in variant.items() if k != "force_per_edge"})
    attrs = {"force_per_edge": True} if "force_per_edge" in variant else {}
    _, losses, groups = _real_problem(qm9_shards, cfg, None, **attrs)
    report = C.check_hvp(losses["total"], groups["all"], n_vectors=2, seed=0)
    assert max(report["fd_self_errors"]) < 1e-6 and report["max_rel_error"] < 1e-4, report


@pytest.mark.parametrize("path", ["mpnn qm9", "both mp"])
def test_float32_hvps_on_the_real_models(path, request):
    """In float32 double backprop keeps ~1e-7 of the float64 product; finite differences with the
    float32 step keep ~1e-4 (the balance-point step cbrt(u) gave errors up to 1.2 on these)."""
    name, enc2d, enc3d = PATHS[path]
    shards = request.getfixturevalue(f"{name}_shards")
    _, losses64, groups64 = _real_problem(shards, enc2d, enc3d)
    _, losses32, groups32 = _real_problem(shards, enc2d, enc3d, dtype=torch.float32)
    v = _unit(C.num_params(groups64["all"]), 5)
    ref = C.hvp_double_backprop(losses64["total"], groups64["all"], v)
    ad = C.hvp_double_backprop(losses32["total"], groups32["all"], v.float())
    fd = C.hvp_finite_difference(losses32["total"], groups32["all"], v.float())
    assert ad.dtype == fd.dtype == torch.float32
    assert _rel(ad.double(), ref) < 1e-5
    assert _rel(fd.double(), ref) < 2e-3


def test_float64_schnet_silently_accepts_a_float32_batch(mp_shards):
    """Why the batch must be cast: the MPNN refuses float32 inputs, but SchNet computes distances
    in the batch's float32 and the float64 RBF centres promote them, so nothing fails."""
    from pipeline.config import ModelConfig
    from pipeline.graphs import collate
    from pipeline.models.property import PropertyModel, target_specs
    from pipeline.shards import ShardDataset

    ds = ShardDataset(mp_shards)
    batch = collate([ds[i] for i in range(4)])
    for enc2d, enc3d in ((None, TINY_3D), (TINY_2D, None)):
        cfg = ModelConfig.model_validate({"encoder2d": enc2d, "encoder3d": enc3d, "heads": {"hidden": 8}})
        model = PropertyModel(cfg, target_specs(ds.manifest["targets"], None, None, None, {})).double().eval()
        if enc3d is not None:
            assert model(batch).dtype == torch.float64
        else:
            with pytest.raises(RuntimeError, match="dtype"):
                model(batch)


def test_lanczos_and_trace_on_a_real_model(mp_shards):
    """Lanczos on a real (SchNet, MP) HVP operator: its Ritz pairs are eigenpairs of the Hessian,
    checked with the independent finite-difference operator."""
    _, losses, groups = _real_problem(mp_shards, None, TINY_3D)
    op = C.HVPOperator(losses["total"], groups["heads"], float64=True)
    res = C.lanczos(op, k=3, iters=40, seed=0)
    assert float(res.residuals.max()) < 1e-6 * float(res.eigenvalues.abs().max())
    fd = C.HVPOperator(losses["total"], groups["heads"], method="fd")
    for theta, y in zip(res.eigenvalues, res.eigenvectors):
        assert _rel(fd(y), float(theta) * y) < 1e-6
