"""Radius search from plain arrays: points A to points B, with periodic images.

:func:`radius_search` is the one neighbour search of the project. Featurisation builds the 3D
graphs of molecules (:func:`molecule_neighbours`) and crystals (:func:`crystal_neighbours`)
with it, pretraining rebuilds the graphs of stored conformers with it, and density probe points
find their atoms with it, at batch time, from arrays alone (no pymatgen ``Structure``).

For crystals the result is the same as pymatgen's ``Structure.get_neighbor_list`` (its
``find_points_in_spheres`` rule, numerical tolerance 1e-8), which earlier versions called: the
same (centre, neighbour, image) triples, and crystal graphs identical edge for edge and in the
same order; tests check both on the 300 shipped MP crystals. (pymatgen searches cutoffs below
1 A differently, keeping ``dist <= cutoff``; no crystal graph has such a cutoff.)

The search is vectorised numpy: the periodic copies of B that can reach A are listed (image
ranges from the fractional extent of A and B and the cutoff, then a box around A), and the
pairs are found by all differences in blocks of A (memory bounded) or, for many points, by
``scipy.spatial.cKDTree``; there is no Python loop per pair or per point.
"""
from __future__ import annotations

import math

import numpy as np
# at import, not inside the first search that needs it: a timed prediction's first molecule would
# otherwise carry the 0.05 s of loading it
from scipy.spatial import cKDTree

#: Default tolerance on the *squared* distance (Angstrom^2): a pair is kept when
#: ``dist**2 < cutoff**2 + tol``. This is pymatgen's ``find_points_in_spheres`` rule with the
#: tolerance ``get_neighbor_list`` passes (1e-8), so periodic graphs match the ones made with it.
PYMATGEN_TOL = 1e-8
# Pairs evaluated per block (A rows x candidates): a few arrays of 4 MiB of float64.
_BLOCK = 1 << 19
# Above this many candidate pairs (Na x periodic copies of B near A) a KD-tree finds the pairs:
# the dense screen costs ~40 ns per candidate pair, the tree's cost grows with the pairs found;
# measured on 2 cores, the tree wins from ~1e5 candidate pairs (density probes), the dense
# screen below (every shipped crystal).
KDTREE_MIN_PAIRS = 1 << 17


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3), got {arr.shape}")
    if not np.isfinite(arr).all():  # NaN would make the periodic image ranges meaningless
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _inverse3(cell: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 matrix by cofactors times the reciprocal determinant.

    Written out, in the arithmetic of pymatgen's ``find_points_in_spheres`` (see
    :func:`_ranking_distances`), and because a LAPACK call costs more than the whole search of
    a small cell when its threads are busy elsewhere.
    """
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = cell.tolist()
    det = m00 * (m11 * m22 - m12 * m21) + m01 * (m12 * m20 - m10 * m22) + m02 * (m10 * m21 - m11 * m20)
    if abs(det) < 1e-12:
        raise ValueError("cell is singular (zero volume)")
    r = 1.0 / det
    return np.array([[(m11 * m22 - m12 * m21) * r, (m02 * m21 - m01 * m22) * r, (m01 * m12 - m02 * m11) * r],
                     [(m12 * m20 - m10 * m22) * r, (m00 * m22 - m02 * m20) * r, (m02 * m10 - m00 * m12) * r],
                     [(m10 * m21 - m11 * m20) * r, (m01 * m20 - m00 * m21) * r, (m00 * m11 - m01 * m10) * r]])


def _times3(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x @ m`` for (n, 3) @ (3, 3), summed left to right as a plain C loop does."""
    return (x[:, 0:1] * m[0] + x[:, 1:2] * m[1]) + x[:, 2:3] * m[2]


def _ranking_distances(pos: np.ndarray, cell: np.ndarray, center: np.ndarray, point: np.ndarray,
                       image: np.ndarray) -> np.ndarray:
    """Edge lengths (E,) evaluated exactly as pymatgen's ``find_points_in_spheres`` evaluates them.

    That is: fractional coordinates through the cofactor inverse, wrapped into [0, 1), back to
    Cartesian, shifted by whole lattice vectors, minus the centre (pymatgen-core 2026.10, the
    pinned version). The value differs from ``|pos[point] + image @ cell - pos[center]|`` in the
    last bits only, but crystal graphs rank neighbours by distance rounded to 1e-8 A, and CIF
    coordinates are decimal: many distances end in 5 at the 9th decimal, where the last bit
    decides the rounding. Ranking by these values keeps the order of equidistant neighbours,
    and so the shards, byte-identical to those made by calling pymatgen.
    """
    frac = _times3(pos, _inverse3(cell))
    wrapped = frac - np.floor(frac)
    shift = (frac - wrapped)[point] + image          # pymatgen's loop offsets: whole numbers
    cart = _times3(wrapped, cell)[point]
    moved = ((shift[:, 0:1] * cell[0] + shift[:, 1:2] * cell[1]) + shift[:, 2:3] * cell[2]) + cart
    d = moved - pos[center]
    return np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])


def _image_candidates(a: np.ndarray, b: np.ndarray, cell: np.ndarray, reach: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every periodic copy of ``b`` that can lie within ``reach`` of some point of ``a``.

    Returns:
        positions (M, 3) ``b[j] + image @ cell``, their index j into ``b`` (M,) and image
        (M, 3) int64, ordered by (j, image): the order the search returns its pairs in.
    """
    inv = _inverse3(cell)
    fa, fb = a @ inv, b @ inv
    # |change of fractional coordinate k| <= |change of position| * |column k of inv(cell)|
    width = reach * np.sqrt((inv * inv).sum(0))
    lo = np.floor(fa.min(0) - fb.max(0) - width).astype(np.int64)
    hi = np.ceil(fa.max(0) - fb.min(0) + width).astype(np.int64)
    # lexicographically ordered images, so candidate order (j, image) is the output order
    images = np.indices(tuple(hi - lo + 1)).reshape(3, -1).T + lo                 # (K, 3)
    shift = images @ cell
    # copies outside the box around A widened by the reach cannot be neighbours: first whole
    # images (by the box of B), then single points
    box_lo, box_hi = a.min(0) - reach, a.max(0) + reach
    useful = ((b.max(0) + shift >= box_lo) & (b.min(0) + shift <= box_hi)).all(1)
    images, shift = images[useful], shift[useful]
    shifted = b[:, None, :] + shift[None, :, :]                                  # (Nb, K, 3)
    inside = ((shifted >= box_lo) & (shifted <= box_hi)).all(2)
    j, k = np.nonzero(inside)
    return shifted[j, k], j, images[k]


def _pairs_dense(a: np.ndarray, cand: np.ndarray, limit2: float, cutoff: float, tol: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs within the cutoff rule by all differences, in blocks of A rows.

    Returns (i, j, s): index into ``a``, index into ``cand``, squared distance; sorted by (i, j).
    """
    rows = max(1, _BLOCK // max(len(cand), 1))
    cx, cy, cz = cand.T
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(a), rows):
        block = a[start:start + rows]
        dx = cx - block[:, 0:1]
        dy = cy - block[:, 1:2]
        dz = cz - block[:, 2:3]
        s = dx * dx + dy * dy + dz * dz   # summed in np.linalg.norm's order, so bit-identical to it
        i, j = np.nonzero(np.sqrt(s) < cutoff if tol == 0 else s < limit2)
        out_i.append(i + start)
        out_j.append(j)
        out_s.append(s[i, j])
    if len(out_i) == 1:
        return out_i[0], out_j[0], out_s[0]
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def _pairs_kdtree(a: np.ndarray, cand: np.ndarray, reach: float, limit2: float, cutoff: float, tol: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same as :func:`_pairs_dense` with KD-trees finding the candidate pairs (A in chunks)."""
    tree = cKDTree(cand)
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    chunk = 8192
    for start in range(0, len(a), chunk):
        found = cKDTree(a[start:start + chunk]).sparse_distance_matrix(tree, reach, output_type="ndarray")
        out_i.append(found["i"].astype(np.int64) + start)
        out_j.append(found["j"].astype(np.int64))
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    # the exact rule, with the same arithmetic as the dense path
    diff = cand[j] - a[i]
    s = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
    keep = np.sqrt(s) < cutoff if tol == 0 else s < limit2
    i, j, s = i[keep], j[keep], s[keep]
    order = np.argsort(i * len(cand) + j, kind="stable")
    return i[order], j[order], s[order]


def radius_search(points_a: np.ndarray, points_b: np.ndarray, cutoff: float, cell: np.ndarray | None = None,
                  exclude_self: bool = False, *, tol: float = PYMATGEN_TOL
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a, b, image) with ``|points_b[b] + image @ cell - points_a[a]| < cutoff``.

    Args:
        points_a: (Na, 3) query points (Angstrom), e.g. the centre atoms or density probes.
        points_b: (Nb, 3) points searched (Angstrom), e.g. the atoms.
        cutoff: radius (Angstrom), > 0.
        cell: (3, 3) lattice vectors as rows for a 3D periodic search (every image of B is
            considered, points need not lie inside the cell); None for an open search.
        exclude_self: drop the pairs (a == b, image == 0); for A and B the same point set.
        tol: tolerance on the squared distance (Angstrom^2): a pair is kept when
            ``dist**2 < cutoff**2 + tol``. The default is pymatgen's rule (see
            :data:`PYMATGEN_TOL`); 0 keeps exactly ``dist < cutoff``.
    Returns:
        idx_a (E,) int64, idx_b (E,) int64, image (E, 3) int64 (zeros without a cell) and
        dist (E,) float64 Angstrom, sorted by (idx_a, idx_b, image). The distance is computed
        as ``sqrt(sum((points_b[b] + image @ cell - points_a[a]) ** 2))``.
    Raises:
        ValueError: shapes that are not (n, 3), points that are not finite, a non-positive
            cutoff, a singular cell, or ``exclude_self`` with A and B of different sizes.
    """
    a = _as_points(points_a, "points_a")
    b = _as_points(points_b, "points_b")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if exclude_self and len(a) != len(b):
        raise ValueError("exclude_self needs points_a and points_b to be the same points")
    limit2 = cutoff * cutoff + tol
    # search radius for candidates: a little above the exact bound, so no pair is lost
    reach = math.sqrt(limit2) * (1 + 1e-9) + 1e-9
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0, np.float64))
    if len(a) == 0 or len(b) == 0:
        return empty
    if cell is None:
        cand, cand_b, cand_img = b, np.arange(len(b), dtype=np.int64), np.zeros((len(b), 3), np.int64)
    else:
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape != (3, 3):
            raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
        cand, cand_b, cand_img = _image_candidates(a, b, cell, reach)
        if len(cand) == 0:
            return empty
    if len(a) * len(cand) > KDTREE_MIN_PAIRS:
        i, j, s = _pairs_kdtree(a, cand, reach, limit2, cutoff, tol)
    else:
        i, j, s = _pairs_dense(a, cand, limit2, cutoff, tol)
    idx_b, image = cand_b[j], cand_img[j]
    if exclude_self:
        keep = (i != idx_b) | image.any(axis=1)
        i, idx_b, image, s = i[keep], idx_b[keep], image[keep], s[keep]
    return i.astype(np.int64, copy=False), idx_b.astype(np.int64, copy=False), image, np.sqrt(s)


def molecule_neighbours(pos: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (src, dst), src != dst, closer than ``cutoff`` (strictly); sorted by (dst, src).

    Args:
        pos: (N, 3) coordinates (Angstrom).
        cutoff: radius (Angstrom).
    Returns:
        src (E,), dst (E,) int64 atom indices; the edge vector is ``pos[src] - pos[dst]``.
    """
    dst, src, _, _ = radius_search(pos, pos, cutoff, None, exclude_self=True, tol=0.0)
    return src, dst


def crystal_neighbours(pos: np.ndarray, cell: np.ndarray, cutoff: float, max_neighbors: int,
                       tie_tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest ``max_neighbors`` periodic neighbours within ``cutoff`` for every atom.

    Args:
        pos: (N, 3) Cartesian coordinates (Angstrom); atoms need not lie inside the cell.
        cell: (3, 3) lattice vectors as rows (Angstrom).
        cutoff: radius (Angstrom), with pymatgen's tolerance (:data:`PYMATGEN_TOL`).
        max_neighbors: neighbours kept per centre atom.
        tie_tolerance: also keep every neighbour within this distance (Angstrom) of the
            ``max_neighbors``-th one. A coordination shell cut in the middle keeps an arbitrary
            part of it, and which part depends on the choice of cell; completing the shell makes
            the graph the same for every cell of the same crystal. 0 cuts strictly.
    Returns:
        src (E,), dst (E,) int64 atom indices and image (E, 3) int64 offsets such that the edge
        vector is ``pos[src] + image @ cell - pos[dst]``, grouped by dst. Within a centre,
        neighbours are ordered by distance rounded to 1e-8 A (see :func:`_ranking_distances`),
        then neighbour index, then image, so the result is deterministic.
    """
    pos = _as_points(pos, "pos")
    cell = np.asarray(cell, dtype=np.float64)
    center, point, images, _ = radius_search(pos, pos, cutoff, cell, exclude_self=True)
    if center.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 3), np.int64)
    dist = _ranking_distances(pos, cell, center, point, images)
    # The search returns pairs sorted by (centre, neighbour, image); a stable sort by (centre,
    # distance rounded to 1e-8 A) keeps that order among ties. np.round(d, 8) is rint(d * 1e8) / 1e8,
    # so the integer rint(d * 1e8) orders and ties alike, and one int64 key sorts 2x faster.
    key = (center << 40) + np.rint(dist * 1e8).astype(np.int64)   # 2**40 * 1e-8 A = 11 km: no overlap
    order = np.argsort(key, kind="stable")
    center, point, images, dist = center[order], point[order], images[order], dist[order]
    # rank within each centre's (sorted) block
    starts = np.r_[0, np.flatnonzero(np.diff(center)) + 1]
    sizes = np.diff(np.r_[starts, center.size])
    rank = np.arange(center.size) - np.repeat(starts, sizes)
    keep = rank < max_neighbors
    if tie_tolerance > 0:
        # distance of each centre's last kept neighbour, broadcast over its block
        last = np.repeat(dist[starts + np.minimum(sizes, max_neighbors) - 1], sizes)
        keep |= dist <= last + tie_tolerance
    return point[keep], center[keep], images[keep]
