"""Numerics of loss-Hessian analysis: Hessian-vector products, Lanczos, trace and spectral density.

Curvature-informed multi-task learning (New et al. 2022) looks at the Hessian of each task's
loss with respect to the model parameters: its top eigenvalues and eigenvectors, its trace and
its spectral density. A Hessian of a graph network has far too many rows to form, so everything
here touches it only through Hessian-vector products (HVPs) ``v -> H v``:

* :func:`hvp_double_backprop`: exact HVP by differentiating ``g(w) . v`` (Pearlmutter 1994),
  which needs every operation's backward to be differentiable itself;
* :func:`hvp_finite_difference`: central differences of the gradient, which needs first
  derivatives only, and so is the fall-back where double backprop is unsupported or wrong;
  :func:`check_hvp` compares the two on random vectors and says which to trust;
* :class:`HVPOperator` wraps either one as a linear operator with a call counter.

On such an operator: :func:`lanczos` (top eigenpairs, full reorthogonalisation),
:func:`hutchinson_trace` and :func:`deflated_trace` (trace), :func:`slq_density` with :func:`broadened_density`,
:func:`spectral_moments` and :func:`negative_mass` (stochastic Lanczos quadrature of the
spectral density, Ubaru, Chen & Saad 2017; Ghorbani et al. 2019, as in PyHessian), and
:func:`level_spacing_ratio` on any set of eigenvalues (random-matrix statistics).

Conventions: a parameter list is flattened in list order into one vector of length ``n``
(:func:`flatten`); vectors live on the parameters' device in their dtype. Random vectors are
drawn on the CPU in float64 from a ``torch.Generator`` seeded by ``seed`` and then moved, so a
seed gives the same vectors on every device and in both float32 and float64. For float64
analysis the caller converts the model (``model.double()``) and casts the batch's float tensors;
the operators use whatever dtype the parameters have. The module is torch only: the loss closure
is where graphs, models and batches come in.

Double backprop through DGL 2.1 (checked on the CPU against finite differences in
tests/test_curvature.py): right on every molmat model path (MPNN with each message function and
Set2Set, SchNet, both), since GSpMM/GSDDMM and segment sums have differentiable backward passes.
Wrong, silently, for segment max/min (``readout_nodes(op="max")``) and, on the CPU,
``edge_softmax``, whose backward passes run raw kernels; no molmat model uses them (Set2Set's
node softmax takes a segment max only as a shift, whose derivative is identically zero). Not
checked on a GPU, where cuDNN's LSTM (Set2Set) has no double backward (pytorch/pytorch#25315):
there run under ``torch.backends.cudnn.flags(enabled=False)`` or use finite differences.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Protocol, Sequence

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]
HVPMethod = Literal["autograd", "fd"]

#: Mean level-spacing ratio <r> of the Gaussian orthogonal ensemble (real symmetric random
#: matrices, large-N numerical value; the 3x3 Wigner-like surmise gives 4 - 2 sqrt 3 = 0.536).
#: Atas, Bogomolny, Giraud & Roux, PRL 110, 084101 (2013).
GOE_MEAN_R = 0.5307
#: Mean level-spacing ratio <r> of uncorrelated (Poisson) levels, ``2 ln 2 - 1``; same reference.
POISSON_MEAN_R = 2.0 * math.log(2.0) - 1.0


class LinearOperator(Protocol):
    """What the spectral routines need of an operator: ``op(v)`` for (n,) ``v``, and ``n``, ``dtype``, ``device``."""

    n: int
    dtype: torch.dtype
    device: torch.device

    def __call__(self, v: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------- flat vectors
def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors, each flattened, in order: list of shapes -> (n,).

    Detached: the flat vector is data, never part of a graph. An empty list gives an empty
    float32 tensor.
    """
    parts = [t.detach().reshape(-1) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0)


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat (n,) vector into views shaped as ``like`` (the inverse of :func:`flatten`).

    Raises:
        ValueError: ``vec`` does not have ``num_params(like)`` entries.
    """
    sizes = [t.numel() for t in like]
    if vec.ndim != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match {sum(sizes)} parameters")
    return [chunk.view_as(t) for chunk, t in zip(vec.split(sizes), like)]


def num_params(params: Iterable[Tensor]) -> int:
    """Total number of scalar entries n of a parameter list."""
    return sum(p.numel() for p in params)


def _check_params(params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("no parameters given")
    if any(not p.requires_grad for p in params):
        raise ValueError("every parameter must have requires_grad=True")
    if len({p.dtype for p in params}) > 1 or len({p.device for p in params}) > 1:
        # a flat vector has one dtype and device; mixed ones would silently round or copy
        raise ValueError("parameters mix dtypes or devices: "
                         f"{sorted({str(p.dtype) for p in params})}, {sorted({str(p.device) for p in params})}")
    return params


def _random_vector(n: int, gen: torch.Generator, like: Tensor, kind: str = "gaussian") -> Tensor:
    """(n,) random vector drawn in float64 on the CPU, then cast to ``like``'s dtype and device."""
    if kind == "rademacher":
        v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2.0 - 1.0
    else:
        v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v.to(dtype=like.dtype, device=like.device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


# ------------------------------------------------------------------------------------- HVPs
def gradient(loss_fn: LossFn, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor | None]:
    """Gradient of the scalar ``loss_fn()`` w.r.t. each parameter (None where the loss does not depend on it).

    Runs with gradients enabled even inside ``torch.no_grad()``.
    """
    with torch.enable_grad():
        loss = loss_fn()
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def _flat_grad(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return flatten(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))


def hvp_double_backprop(loss_fn: LossFn, params: Sequence[Tensor], v: Tensor) -> Tensor:
    """Hessian-vector product ``H v`` by double backpropagation (Pearlmutter 1994).

    The gradient ``g(w)`` is built with ``create_graph=True`` and ``H v = d(g . v)/dw``. Exact up
    to rounding, at about twice to four times the cost of a gradient, but only as right as the
    backward passes are differentiable: an autograd Function whose backward runs untracked
    kernels drops second-order terms without an error. :func:`check_hvp` finds out.

    Args:
        loss_fn: zero-argument closure recomputing the scalar loss (it may sum over fixed batches).
        params: the parameters w (requires_grad), n entries in all.
        v: (n,) direction, flattened in ``params`` order.
    Returns:
        (n,) ``H v``, detached; zero in the rows of parameters the loss does not depend on.
    """
    params = _check_params(params)
    with torch.enable_grad():
        grads = gradient(loss_fn, params, create_graph=True)
        dot = None
        for g, d in zip(grads, unflatten(v.to(params[0]), params)):
            # a gradient without a graph is constant in w: it adds nothing to H v
            if g is not None and g.requires_grad:
                term = (g * d).sum()
                dot = term if dot is None else dot + term
        if dot is None:
            return torch.zeros(num_params(params), dtype=params[0].dtype, device=params[0].device)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
    return _flat_grad(hv, params)


def fd_relative_step(dtype: torch.dtype) -> float:
    """The constant c of the default finite-difference step ``h = c (1 + |w|)`` for a dtype.

    A central difference has truncation error ~ h^2 (third derivatives) and rounding error
    ~ u / h (u: machine epsilon); they balance at ``c = cbrt(u)``, 6.1e-6 in float64. In float32
    that balance point (4.9e-3) is too long a step for molmat's models: with ``|w|`` ~ 30 the
    parameters move by ~0.15, past ReLU kinks and into higher derivatives, and ``H v`` came out
    wrong by 5e-2 to 1.2 (relative, vs. float64 double backprop) on the MPNN paths. A ten times
    shorter step gave 6e-5 to 6e-4 on every path, parameter group and loss (16 QM9 / MP
    records; MPNN, SchNet and both), so below float64 the constant is ``cbrt(u) / 10`` (4.9e-4
    in float32). In float64 the balance point gave 2e-11 to 4e-8, shorter steps no better.
    """
    u = torch.finfo(dtype).eps
    return u ** (1.0 / 3.0) if dtype == torch.float64 else u ** (1.0 / 3.0) / 10.0


def default_fd_eps(w: Tensor, v: Tensor) -> float:
    """Default step of :func:`hvp_finite_difference`: ``eps = c (1 + |w|) / |v|``.

    The step length ``eps |v|`` is relative to the parameters' size; ``c`` is
    :func:`fd_relative_step` of ``w``'s dtype: about 6.1e-6 in float64 and 4.9e-4 in float32,
    where only three or four digits of ``H v`` survive.

    Args:
        w: (n,) current parameters. v: (n,) direction.
    Returns:
        eps (0 for a zero ``v``).
    """
    v_norm = float(v.norm())
    if v_norm == 0.0:
        return 0.0
    return fd_relative_step(w.dtype) * (1.0 + float(w.norm())) / v_norm


def hvp_finite_difference(loss_fn: LossFn, params: Sequence[Tensor], v: Tensor, eps: float | None = None) -> Tensor:
    """Hessian-vector product ``H v ~ (g(w + eps v) - g(w - eps v)) / (2 eps)`` from two gradients.

    Needs first derivatives only, so it is right wherever the gradient is, at the price of an
    O(eps^2) truncation error, O(u / eps) rounding error, and no meaning where the loss is not
    twice differentiable within ``eps |v|`` of ``w`` (a ReLU changing sign, a max switching).
    The parameters are modified in place during the call and restored afterwards by copying
    back saved values (bitwise, also on an exception); ``.grad`` is not touched.

    Args:
        loss_fn: zero-argument closure recomputing the scalar loss.
        params: the parameters w (requires_grad), n entries in all.
        v: (n,) direction, flattened in ``params`` order.
        eps: step along ``v``; default :func:`default_fd_eps`.
    Returns:
        (n,) approximate ``H v``.
    """
    params = _check_params(params)
    v = v.to(params[0])
    saved = [p.detach().clone() for p in params]
    if eps is None:
        eps = default_fd_eps(flatten(saved), v)
    if eps == 0.0:
        return torch.zeros_like(v)
    steps = unflatten(v, params)
    try:
        with torch.no_grad():
            for p, s, d in zip(params, saved, steps):
                p.copy_(s + eps * d)
        g_plus = _flat_grad(gradient(loss_fn, params), params)
        with torch.no_grad():
            for p, s, d in zip(params, saved, steps):
                p.copy_(s - eps * d)
        g_minus = _flat_grad(gradient(loss_fn, params), params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return (g_plus - g_minus) / (2.0 * eps)


class HVPOperator:
    """The Hessian of ``loss_fn`` w.r.t. ``params`` as a linear operator ``v -> H v``.

    The operator works in the parameters' dtype and on their device. For float64 analysis
    convert the model first (``model.double()``) and cast the batch's float inputs and targets
    inside ``loss_fn``; ``float64=True`` only checks that this was done.

    Args:
        loss_fn: zero-argument closure recomputing the scalar loss.
        params: the parameters (requires_grad, one dtype and device).
        method: ``"autograd"`` (:func:`hvp_double_backprop`) or ``"fd"`` (:func:`hvp_finite_difference`).
        eps: finite-difference step (``"fd"`` only; default :func:`default_fd_eps`).
        float64: refuse parameters that are not float64.
    Attributes:
        n: number of parameters. dtype, device: those of the parameters.
        calls: HVPs computed so far (each costs two gradients, or one double backward).
    Shapes: ``op(v)`` maps (n,) to (n,).
    """

    def __init__(self, loss_fn: LossFn, params: Iterable[Tensor], method: HVPMethod = "autograd",
                 eps: float | None = None, float64: bool = False) -> None:
        if method not in ("autograd", "fd"):
            raise ValueError(f"unknown HVP method {method!r}; expected 'autograd' or 'fd'")
        self.params = _check_params(params)
        if float64 and self.params[0].dtype != torch.float64:
            raise ValueError(f"parameters are {self.params[0].dtype}; call model.double() (and cast the batch) "
                             "before building a float64 operator")
        self.loss_fn = loss_fn
        self.method = method
        self.eps = eps
        self.n = num_params(self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        """(n,) -> (n,) Hessian-vector product."""
        self.calls += 1
        if self.method == "autograd":
            return hvp_double_backprop(self.loss_fn, self.params, v)
        return hvp_finite_difference(self.loss_fn, self.params, v, self.eps)


class DenseOperator:
    """A symmetric (n, n) matrix as a :class:`LinearOperator` (for tests and small problems).

    Attributes:
        matrix: (n, n). n, dtype, device: its size, dtype and device. calls: products so far.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        """(n,) -> (n,) matrix-vector product."""
        self.calls += 1
        return self.matrix @ v


def check_hvp(loss_fn: LossFn, params: Sequence[Tensor], n_vectors: int = 3, seed: int = 0,
              eps: float | None = None, fd_check: bool = True) -> dict[str, object]:
    """Compare double-backprop HVPs with finite differences on random unit vectors.

    Where they disagree by far more than the finite-difference error (~1e-8 relative in
    float64 on smooth losses; ~1e-3 in float32), double backprop is wrong (some backward is
    not differentiable) and :func:`hvp_finite_difference` is the one to use. A failing double
    backprop (an exception) is reported, not raised. The finite differences are themselves
    checked against a step four times smaller (``fd_self_errors``): they disagree where the
    loss is not smooth within the step (a ReLU input or a max within ``eps |v|`` of a switch),
    and then neither number is to be trusted at that step.

    Args:
        loss_fn, params: as in :func:`hvp_double_backprop`.
        n_vectors: random directions (Gaussian, normalised).
        seed: seeds the directions.
        eps: finite-difference step (default :func:`default_fd_eps`).
        fd_check: also compute the finite differences at ``eps / 4`` (two more gradients per vector).
    Returns:
        ``rel_errors`` (list of ``|Hv_ad - Hv_fd| / |Hv_fd|`` per vector), ``max_rel_error``,
        ``fd_self_errors`` (``|Hv_fd(eps) - Hv_fd(eps/4)| / |Hv_fd(eps)|`` per vector, empty
        without ``fd_check``), ``hv_norms`` (``|Hv_fd|`` per vector), ``eps`` (step per
        vector), ``error`` (the exception text when double backprop raised, else None; the
        errors are then inf).
    """
    params = _check_params(params)
    gen = _generator(seed)
    n = num_params(params)
    w = flatten(params)
    rel, rel_x, self_rel, norms, steps = [], [], [], [], []
    error: str | None = None
    tiny = torch.finfo(params[0].dtype).tiny
    for _ in range(n_vectors):
        v = _random_vector(n, gen, params[0])
        v = v / v.norm()
        step = default_fd_eps(w, v) if eps is None else eps
        fd = hvp_finite_difference(loss_fn, params, v, step)
        norms.append(float(fd.norm()))
        steps.append(step)
        fine = None
        if fd_check:
            fine = hvp_finite_difference(loss_fn, params, v, step / 4.0)
            self_rel.append(float((fine - fd).norm()) / max(norms[-1], tiny))
        try:
            ad = hvp_double_backprop(loss_fn, params, v)
        except RuntimeError as exc:
            error = f"{type(exc).__name__}: {exc}"
            rel.append(math.inf)
            rel_x.append(math.inf)
            continue
        rel.append(float((ad - fd).norm()) / max(norms[-1], tiny))
        if fine is not None:
            # Richardson: central differences err by c eps^2, so (16 fd(eps/4) - fd(eps)) / 15
            # cancels that term; a model with large third derivatives (PaiNN's vector norms)
            # needs it, or a correct double backward looks wrong next to a biased reference
            rel_x.append(float((ad - (16.0 * fine - fd) / 15.0).norm()) / max(norms[-1], tiny))
    return {"rel_errors": rel, "max_rel_error": max(rel), "fd_self_errors": self_rel, "hv_norms": norms,
            "rel_errors_extrapolated": rel_x, "max_rel_error_extrapolated": max(rel_x) if rel_x else math.inf,
            "eps": steps, "error": error}


# ---------------------------------------------------------------------------------- Lanczos
@dataclass
class LanczosResult:
    """Top eigenpairs of a symmetric operator from :func:`lanczos`.

    Attributes:
        eigenvalues: (k,) largest algebraic Ritz values, descending (float64, CPU).
        eigenvectors: (k, n) unit Ritz vectors (operator dtype and device), row i for value i.
        residuals: (k,) true residual norms ``|H y - theta y|`` (one extra product each), or
            None when not computed.
        residual_estimates: (k,) the Lanczos estimates ``|beta_m s_{m,i}|``: equal to the true
            residuals in exact arithmetic; zero when the last step broke down.
        iterations: Lanczos steps taken m (operator products, not counting residuals).
        breakdowns: times the Krylov space became invariant (beta ~ 0).
        tridiagonal: (m, m) the projected matrix T (float64, CPU).
        basis: (m, n) the orthonormal Lanczos vectors Q (operator dtype and device), with
            ``Q H Q^T = T``; row 0 is the normalised start vector.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor | None
    residual_estimates: Tensor
    iterations: int
    breakdowns: int
    tridiagonal: Tensor
    basis: Tensor | None = None


def _tridiagonal(alpha: Sequence[float], beta: Sequence[float]) -> Tensor:
    m = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[:m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def breakdown_tol(n: int, dtype: torch.dtype) -> float:
    """Default Lanczos breakdown threshold, ``10 sqrt(n) u`` (u: machine epsilon of ``dtype``).

    Once the Krylov space is invariant, the reorthogonalised remainder is rounding noise of
    about ``sqrt(n) u |H|`` (measured: 1 to 2 times that for exact matrix-vector products); a
    beta below ten times this is taken as zero. Finite-difference products carry far larger
    noise, so with them an invariant subspace is simply not detected (no harm: Lanczos
    continues in a direction of noise, orthogonal to the rest).
    """
    return 10.0 * math.sqrt(n) * torch.finfo(dtype).eps


def _lanczos_run(op: LinearOperator, v0: Tensor, iters: int, tol: float, restart: bool,
                 gen: torch.Generator) -> tuple[Tensor, list[float], list[float], int]:
    """The Lanczos recurrence with full reorthogonalisation.

    Returns:
        Q (m, n) orthonormal basis, alpha (m,), beta (m,) (``beta[j]`` couples steps j and j+1;
        ``beta[m-1]`` is the residual coupling of the last step), breakdowns.
    """
    n = op.n
    iters = min(int(iters), n)
    basis = torch.zeros(iters, n, dtype=op.dtype, device=op.device)
    q = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    breakdowns = 0
    scale = 0.0  # running estimate of |T|, the yardstick of "beta ~ 0"
    for j in range(iters):
        basis[j] = q
        w = op(q)
        a = float(torch.dot(w, q))
        w = w - a * q
        if j > 0 and beta[-1] != 0.0:
            w = w - beta[-1] * basis[j - 1]
        # full reorthogonalisation, twice ("twice is enough", Parlett): without it Ritz values
        # repeat (ghost eigenvalues) once the first ones converge
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        b = float(w.norm())
        alpha.append(a)
        scale = max(scale, abs(a), b)
        if j + 1 == iters:
            beta.append(b)
            break
        if b <= tol * max(scale, torch.finfo(op.dtype).tiny):
            # invariant subspace: T is exact on it; continue (block-diagonal T) from a fresh
            # direction orthogonal to it, or stop
            breakdowns += 1
            beta.append(0.0)
            if not restart:
                break
            w = _random_vector(n, gen, basis)
            for _ in range(2):
                w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
            q = w / w.norm()
            continue
        beta.append(b)
        q = w / b
    m = len(alpha)
    return basis[:m], alpha, beta, breakdowns


def lanczos(op: LinearOperator, k: int, iters: int, seed: int = 0, tol: float | None = None,
            residuals: bool = True, v0: Tensor | None = None) -> LanczosResult:
    """Largest algebraic eigenvalues and Ritz vectors of a symmetric operator by Lanczos.

    Every new Lanczos vector is Gram-Schmidt orthogonalised against all previous ones, twice, so
    Ritz values do not repeat spuriously; memory is (iters, n) in the operator's dtype. When the
    Krylov space becomes invariant (beta ~ 0), it is continued from a random vector orthogonal
    to it, so ``iters = n`` recovers the whole spectrum with multiplicities.

    Args:
        op: symmetric operator (:class:`HVPOperator`, :class:`DenseOperator`, ...).
        k: eigenpairs wanted (at most ``iters``).
        iters: Lanczos steps m (capped at n); extreme eigenvalues converge first.
        seed: seeds the Gaussian start vector (and restart vectors).
        tol: breakdown threshold on beta relative to the largest |alpha|, |beta| so far;
            default :func:`breakdown_tol`.
        residuals: compute the true residuals (k more products).
        v0: (n,) start vector instead of a random one.
    Returns:
        :class:`LanczosResult` with ``min(k, iters, n)`` eigenpairs.
    """
    n = op.n
    if k < 1 or iters < 1:
        raise ValueError(f"need k >= 1 and iters >= 1, got k={k}, iters={iters}")
    if tol is None:
        tol = breakdown_tol(n, op.dtype)
    gen = _generator(seed)
    like = torch.zeros(0, dtype=op.dtype, device=op.device)
    start = _random_vector(n, gen, like) if v0 is None else v0.to(like)
    basis, alpha, beta, breakdowns = _lanczos_run(op, start, iters, tol, True, gen)
    t = _tridiagonal(alpha, beta)
    theta, s = torch.linalg.eigh(t)
    order = torch.argsort(theta, descending=True)[:min(k, len(alpha))]
    theta, s = theta[order], s[:, order]
    vectors = s.T.to(basis) @ basis
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    estimates = (beta[-1] * s[-1]).abs()
    true = None
    if residuals:
        true = torch.tensor([float((op(y) - float(th) * y).norm()) for th, y in zip(theta, vectors)],
                            dtype=torch.float64)
    return LanczosResult(theta, vectors, true, estimates, len(alpha), breakdowns, t, basis)


# ------------------------------------------------------------------------ trace and density
def hutchinson_trace(op: LinearOperator, probes: int, seed: int = 0) -> tuple[float, float, list[float]]:
    """Hutchinson's estimate of ``tr(H)`` from Rademacher probes z: ``E[z^T H z] = tr(H)``.

    Args:
        op: symmetric operator. probes: number of probes (products).
        seed: seeds the probes.
    Returns:
        (mean, standard error of the mean (nan for one probe), per-probe samples ``z^T H z``).
    """
    return _hutchinson(op, probes, seed, None)


def _hutchinson(op: LinearOperator, probes: int, seed: int, basis: Tensor | None) -> tuple[float, float, list[float]]:
    """Mean, standard error and samples of ``z^T H z`` over Rademacher z, projected off ``basis``'s rows if given."""
    if probes < 1:
        raise ValueError(f"need at least one probe, got {probes}")
    gen = _generator(seed)
    like = torch.zeros(0, dtype=op.dtype, device=op.device)
    samples = []
    for _ in range(probes):
        z = _random_vector(op.n, gen, like, "rademacher")
        if basis is not None:
            for _ in range(2):  # twice, as in the Lanczos run: one pass leaves rounding-size components
                z = z - basis.T @ (basis @ z)
        samples.append(float(torch.dot(z, op(z))))
    mean = statistics.fmean(samples)
    stderr = statistics.stdev(samples) / math.sqrt(probes) if probes > 1 else math.nan
    return mean, stderr, samples


def deflated_trace(op: LinearOperator, basis: Tensor, tridiagonal: Tensor, probes: int, seed: int = 0
                   ) -> tuple[float, float, list[float]]:
    """``tr(H)`` as the exact trace on a Krylov subspace plus Hutchinson on the rest (Hutch++-style).

    With an orthonormal Lanczos basis Q (m, n), ``P = Q^T Q`` and ``T = Q H Q^T``,
    ``tr(H) = tr(T) + tr((I - P) H (I - P))``; the second term is estimated from Rademacher z
    projected off the subspace, ``z' = z - Q^T Q z``, by ``z'^T H z'``. The subspace holds the top
    of the spectrum (Lanczos finds the outliers first), whose eigenvalues dominate the variance
    of plain Hutchinson (``2 sum_{i != j} H_ij^2``); a network Hessian is a few outliers over a
    bulk near zero, so the same probes give a much smaller error (Meyer, Musco, Musco & Woodruff
    2021, with Lanczos instead of a random sketch). Unbiased: Q comes from a start vector drawn
    independently of the probes.

    Args:
        op: symmetric operator. basis: (m, n) orthonormal rows (:attr:`LanczosResult.basis`).
        tridiagonal: (m, m) ``Q H Q^T`` (:attr:`LanczosResult.tridiagonal`).
        probes: Rademacher probes (products). seed: seeds them.
    Returns:
        (estimate, standard error (nan for one probe), per-probe samples of the deflated term).
    """
    rest, stderr, samples = _hutchinson(op, probes, seed, basis)
    return float(torch.trace(tridiagonal)) + rest, stderr, samples


def rademacher_start(n: int, seed: int, like: Tensor) -> Tensor:
    """(n,) Rademacher vector of ``seed`` in ``like``'s dtype and device: a Lanczos start that is
    also a valid stochastic-Lanczos-quadrature start (:func:`slq_density` draws the same way)."""
    return _random_vector(n, _generator(seed), like, "rademacher")


def quadrature(tridiagonal: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of a Lanczos run: nodes (m,) = eigenvalues of T, weights (m,) = squared
    first components of its eigenvectors (float64); see :func:`slq_density`."""
    theta, s = torch.linalg.eigh(tridiagonal.to(torch.float64))
    return theta, s[0] ** 2


def slq_density(op: LinearOperator, iters: int, starts: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature of the spectral density (Ubaru, Chen & Saad 2017).

    For each start, Lanczos (full reorthogonalisation) from a normalised Rademacher vector v
    gives T; its eigenvalues are the Gauss quadrature nodes and the squared first components of
    its eigenvectors the weights, so ``sum_i w_i f(theta_i) ~ v^T f(H) v``, exact for
    polynomials f of degree < 2 iters. Averaged over starts, this estimates ``(1/n) tr f(H)``,
    i.e. integrals against the spectral density ``(1/n) sum_j delta(x - lambda_j)``.

    Args:
        op: symmetric operator. iters: Lanczos steps per start (capped at n).
        starts: independent start vectors. seed: seeds them.
    Returns:
        nodes (starts, iters) and weights (starts, iters), float64 on the CPU; each start's
        weights sum to 1. A start whose Krylov space became invariant after m < iters steps
        (the quadrature is then exact) has its last iters - m entries padded with weight 0
        (node: its largest node).
    """
    gen = _generator(seed)
    like = torch.zeros(0, dtype=op.dtype, device=op.device)
    iters = min(int(iters), op.n)
    tol = breakdown_tol(op.n, op.dtype)
    nodes = torch.zeros(starts, iters, dtype=torch.float64)
    weights = torch.zeros(starts, iters, dtype=torch.float64)
    for i in range(starts):
        v = _random_vector(op.n, gen, like, "rademacher")
        _, alpha, beta, _ = _lanczos_run(op, v, iters, tol, False, gen)
        theta, s = torch.linalg.eigh(_tridiagonal(alpha, beta))
        m = theta.numel()
        nodes[i, :m] = theta
        nodes[i, m:] = theta[-1]
        weights[i, :m] = s[0] ** 2
    return nodes, weights


def broadened_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Spectral density on a grid: quadrature nodes broadened by Gaussians of width ``sigma``.

    ``phi(x) = (1/S) sum_s sum_i w_si N(x; theta_si, sigma^2)``; integrates to ~1 when the grid
    covers the nodes by a few sigma.

    Args:
        nodes, weights: (S, m) from :func:`slq_density`. grid: (G,) points. sigma: width > 0.
    Returns:
        (G,) density, float64.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = grid.to(torch.float64).reshape(-1, 1, 1)
    gauss = torch.exp(-0.5 * ((x - nodes.to(torch.float64)) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))
    return (gauss * weights.to(torch.float64)).sum(dim=2).mean(dim=1)


def spectral_moments(nodes: Tensor, weights: Tensor, orders: Sequence[int]) -> Tensor:
    """Estimates of the spectral moments ``(1/n) tr(H^p)`` for each order p.

    Exact per start (``v^T H^p v``) for ``p < 2 m`` with m Lanczos steps; the error is the
    sampling error of the start vectors, about ``sqrt(2 / S) |H^p|_F / n`` for S Rademacher starts.

    Args:
        nodes, weights: (S, m) from :func:`slq_density`. orders: powers p >= 0.
    Returns:
        (len(orders),) float64; order 0 gives 1.
    """
    nodes = nodes.to(torch.float64)
    weights = weights.to(torch.float64)
    return torch.stack([(weights * nodes ** int(p)).sum(dim=1).mean() for p in orders])


def negative_mass(nodes: Tensor, weights: Tensor) -> float:
    """Fraction of spectral mass below zero: estimates (number of negative eigenvalues) / n.

    Quadrature nodes are smeared versions of the eigenvalues, so eigenvalues close to zero
    (relative to the node spacing) can fall on either side unless m approaches n.

    Args:
        nodes, weights: (S, m) from :func:`slq_density`.
    """
    return float((weights.to(torch.float64) * (nodes < 0)).sum(dim=1).mean())


def level_spacing_ratio(eigenvalues: Tensor | Sequence[float]) -> float:
    """Mean ratio of consecutive level spacings ``<r>`` (Oganesyan & Huse 2007).

    With sorted levels and spacings ``s_i = lambda_{i+1} - lambda_i``,
    ``r_i = min(s_i, s_{i+1}) / max(s_i, s_{i+1})``. Unlike the spacing distribution it needs no
    unfolding of the density. Correlated (GOE) levels give :data:`GOE_MEAN_R` ~ 0.5307,
    uncorrelated (Poisson) levels :data:`POISSON_MEAN_R` = 2 ln 2 - 1 ~ 0.3863 (Atas, Bogomolny,
    Giraud & Roux, PRL 110, 084101 (2013)).

    Args:
        eigenvalues: (m,) levels, m >= 3, any order. Pairs of zero spacings (degenerate levels)
            are skipped.
    Returns:
        <r> in [0, 1]; nan when no ratio is defined.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1).sort().values
    if lam.numel() < 3:
        raise ValueError(f"need at least 3 levels, got {lam.numel()}")
    s = lam.diff()
    lo = torch.minimum(s[:-1], s[1:])
    hi = torch.maximum(s[:-1], s[1:])
    keep = hi > 0
    return float((lo[keep] / hi[keep]).mean()) if bool(keep.any()) else math.nan


# --------------------------------------------------------------------------------------- cost
def time_hvp_vs_grad(loss_fn: LossFn, params: Sequence[Tensor], repeats: int = 5, seed: int = 0) -> dict[str, object]:
    """Seconds of one gradient and one HVP (both methods), measured in the same run.

    Each is run once to warm up, then ``repeats`` times; medians are reported. CUDA work is
    synchronised before each clock reading.

    Args:
        loss_fn, params: as in :func:`hvp_double_backprop`. repeats: timed runs of each.
        seed: seeds the (unit, Gaussian) direction.
    Returns:
        ``grad_s``, ``hvp_autograd_s``, ``hvp_fd_s`` (median seconds), ``ratio_autograd`` and
        ``ratio_fd`` (HVP over gradient), ``n``, ``repeats``, and ``autograd_error`` (the text of
        the exception when double backprop raised; its time and ratio are then nan).
    """
    params = _check_params(params)
    v = _random_vector(num_params(params), _generator(seed), params[0])
    v = v / v.norm()
    sync = torch.cuda.synchronize if params[0].device.type == "cuda" else (lambda: None)

    def median_seconds(fn: Callable[[], object]) -> float:
        fn()
        sync()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    grad_s = median_seconds(lambda: gradient(loss_fn, params))
    fd_s = median_seconds(lambda: hvp_finite_difference(loss_fn, params, v))
    error = None
    try:
        ad_s = median_seconds(lambda: hvp_double_backprop(loss_fn, params, v))
    except RuntimeError as exc:
        ad_s, error = math.nan, f"{type(exc).__name__}: {exc}"
    return {"grad_s": grad_s, "hvp_autograd_s": ad_s, "hvp_fd_s": fd_s, "ratio_autograd": ad_s / grad_s,
            "ratio_fd": fd_s / grad_s, "n": num_params(params), "repeats": repeats, "autograd_error": error}
