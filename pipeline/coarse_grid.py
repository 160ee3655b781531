"""Whole-grid predictions from a coarse grid: cubic B-spline upsampling and the points near nuclei.

A density model predicts a whole cube (0.2-0.3 M points for a QM9 molecule) fastest by evaluating
the network on every ``s``-th point per axis, interpolating ``log rho`` between them, and evaluating
directly only where the density is too sharp for the coarse grid: within a radius of a nucleus.
This module owns the two grid computations of that scheme (``finetune.density.predict_on_grid``
owns the scheme):

* :func:`upsample` evaluates the tensor-product cubic B-spline whose coefficients live on the
  coarse grid at every fine point. Because the fine points sit at the same fractions ``i / s`` of a
  coarse step along every row, the spline is applied one axis at a time with ``s`` fixed sets of 4
  weights, instead of 64 weights per point as a general interpolator (``scipy.ndimage.map_coordinates``,
  the reference of its test) computes them. Measured on one thread for a 0.21 M-point QM9 grid at
  ``s = 3``: about 5x less time than ``map_coordinates``.
* :func:`points_near_atoms` lists the grid points within a radius of any atom (periodic images
  included) from each atom's box of grid indices, instead of a neighbour search over every grid
  point (the reference of its test is that search, :func:`pipeline.density_data.probe_graph`).

Grids follow the cube convention: point ``(i, j, k)`` is at ``origin + (i, j, k) @ axes`` (rows of
``axes`` are the steps, Angstrom), values in C order.
"""
from __future__ import annotations

import itertools

import numpy as np


def coarse_shape(shape: tuple[int, int, int], stride: int) -> tuple[int, int, int]:
    """Points per axis of the coarse grid of every ``stride``-th fine point, reaching one coarse step
    past the last fine point where ``stride`` does not divide ``n - 1`` (so every fine point lies
    inside the coarse grid)."""
    return tuple((int(n) - 1 + stride - 1) // stride + 1 for n in shape)  # type: ignore[return-value]


def _bspline_weights(x: np.ndarray) -> np.ndarray:
    """(4, M) cubic B-spline weights of the coefficients at ``floor(t) - 1 .. floor(t) + 2`` for the
    fractional parts ``x = t - floor(t)`` (M,)."""
    x2, x3 = x * x, x * x * x
    return np.stack([(1 - x) ** 3 / 6, (3 * x3 - 6 * x2 + 4) / 6, (-3 * x3 + 3 * x2 + 3 * x + 1) / 6, x3 / 6])


def upsample(coeffs: np.ndarray, stride: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The cubic spline with coefficients ``coeffs`` on the coarse grid, at every fine point.

    The same function as ``scipy.ndimage.map_coordinates(coeffs, fine / stride, order=3,
    mode="nearest", prefilter=False)``: coefficients beyond the coarse grid's ends repeat the end ones.

    Args:
        coeffs: (C0, C1, C2) B-spline coefficients (``scipy.ndimage.spline_filter`` of the coarse
            values), with ``(C0, C1, C2) == coarse_shape(shape, stride)``.
        stride: fine points per coarse step.
        shape: (F0, F1, F2) the fine grid.
    Returns:
        (F0, F1, F2) float64 values at fine point ``(i, j, k)``, i.e. at coarse coordinate
        ``(i, j, k) / stride``.
    """
    out = np.asarray(coeffs, dtype=np.float64)
    if tuple(out.shape) != coarse_shape(shape, stride):
        raise ValueError(f"coefficients of shape {out.shape} are not the stride-{stride} coarse grid of {shape}")
    for axis, n in enumerate(shape):
        t = np.arange(int(n)) / stride
        base = np.floor(t).astype(np.int64)
        w = _bspline_weights(t - base)
        last = out.shape[axis] - 1
        view = [1, 1, 1]
        view[axis] = int(n)
        acc = None
        for j in range(4):
            term = np.take(out, np.clip(base - 1 + j, 0, last), axis=axis) * w[j].reshape(view)
            acc = term if acc is None else acc + term
        out = acc
    return out


def _image_shifts(origin: np.ndarray, axes: np.ndarray, shape: tuple[int, int, int], pos: np.ndarray,
                  radius: float, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atom images whose ball of ``radius`` can reach the grid: (M,) atom index and (M, 3) centres."""
    inv_cell = np.linalg.inv(cell)
    corners = origin + np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=np.float64) @ axes
    frac = corners @ inv_cell
    lo, hi = frac.min(axis=0), frac.max(axis=0)
    reach = radius * np.linalg.norm(inv_cell, axis=0)
    atoms, centres = [], []
    for a, p in enumerate(pos):
        f = p @ inv_cell
        ranges = [range(int(np.floor(lo[j] - f[j] - reach[j])), int(np.ceil(hi[j] - f[j] + reach[j])) + 1)
                  for j in range(3)]
        shifts = np.array(list(itertools.product(*ranges)), dtype=np.float64).reshape(-1, 3)
        atoms.append(np.full(len(shifts), a, dtype=np.int64))
        centres.append(p + shifts @ cell)
    return np.concatenate(atoms), np.concatenate(centres).reshape(-1, 3)


def points_near_atoms(origin: np.ndarray, axes: np.ndarray, shape: tuple[int, int, int], pos: np.ndarray,
                      radius: float | np.ndarray, cell: np.ndarray | None = None) -> np.ndarray:
    """Flat (C-order) indices of the grid points closer than ``radius`` to an atom.

    Args:
        origin: (3,) Angstrom. axes: (3, 3) grid steps as rows, Angstrom. shape: points per axis.
        pos: (N, 3) atom positions, Angstrom.
        radius: Angstrom, one for every atom or (N,) per atom (0: none near that atom); the rule is
            exactly ``distance < radius`` (as :func:`probe_graph`).
        cell: (3, 3) lattice rows for a crystal (every periodic image of the atoms counts), or None.
    Returns:
        (M,) sorted unique int64 indices into the flattened grid.
    """
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    axes = np.asarray(axes, dtype=np.float64).reshape(3, 3)
    shape = tuple(int(n) for n in np.asarray(shape).reshape(3))
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pos),))
    if len(pos) == 0 or not (radii > 0).any():
        return np.zeros(0, dtype=np.int64)
    if cell is None:
        owner, centres = np.arange(len(pos)), pos
    else:
        owner, centres = _image_shifts(origin, axes, shape, pos, float(radii.max()),
                                       np.asarray(cell, dtype=np.float64).reshape(3, 3))
    inv = np.linalg.inv(axes)               # grid index of x: (x - origin) @ inv
    reach = np.linalg.norm(inv, axis=0)     # a ball of radius r spans +- r |inv[:, j]| in index j
    dims = np.array(shape)
    found = []
    for a, c in zip(owner, centres):
        r = float(radii[a])
        if r <= 0:
            continue
        half, r2 = r * reach, r * r
        ic = (c - origin) @ inv
        lo = np.maximum(np.ceil(ic - half).astype(np.int64), 0)
        hi = np.minimum(np.floor(ic + half).astype(np.int64), dims - 1)
        if np.any(hi < lo):
            continue
        idx = np.stack(np.meshgrid(*[np.arange(lo[j], hi[j] + 1) for j in range(3)], indexing="ij"), axis=-1)
        idx = idx.reshape(-1, 3)
        d = origin + idx @ axes - c
        keep = np.einsum("ij,ij->i", d, d) < r2
        if keep.any():
            found.append(np.ravel_multi_index(tuple(idx[keep].T), shape))
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(found))
