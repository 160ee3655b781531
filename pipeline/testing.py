"""Invariance helpers: the same structure described differently, and a check that a model agrees.

A model of molecules and crystals must not depend on the frame (rotation, translation), on the
order of the atoms, or, for crystals, on the choice of unit cell. These helpers make the other
descriptions of a record, following :data:`pipeline.records.SCHEMA` (each array says how it
transforms), and :func:`assert_invariant` checks a function of records against them::

    from pipeline import testing as T
    from pipeline.graphs import collate

    def embed(records):                       # list of records -> (B, D) array
        return model(collate(records))[0].detach().numpy()

    T.assert_invariant(embed, records, {
        "rotation": lambda r: T.rotate(r, T.random_rotation(0)),
        "translation": lambda r: T.translate(r, [1.0, -2.0, 0.5]),
        "permutation": lambda r: T.permute(r, T.random_permutation(r, seed=1)),
    })

Crystals also have :func:`supercell` (another cell of the same crystal, neighbour lists re-derived
with the same featurisation settings) and :func:`wrap` (atoms moved into the cell). The helpers
never modify their input; they raise ``ValueError`` for a record key the schema does not know,
since they could not transform it correctly.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline import records as R
from pipeline.config import PreprocessConfig
from pipeline.neighbours import crystal_neighbours

Record = dict[str, Any]


def _specs(record: Record) -> dict[str, R.ArraySpec]:
    """Schema entry of every key of ``record``; a key the schema does not know is an error."""
    unknown = sorted(k for k in record if k not in R.SPECS)
    if unknown:
        raise ValueError(f"record {record.get(R.ID)!r} has keys {unknown} that pipeline.records.SCHEMA does not "
                         "describe; add them there so they can be transformed")
    return {k: R.SPECS[k] for k in record}


def random_rotation(seed: int) -> np.ndarray:
    """A proper rotation matrix (3, 3) (det +1), uniformly random for the seed (QR of a Gaussian)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotate(record: Record, rotation: np.ndarray) -> Record:
    """The record rotated by ``rotation`` (3, 3): points become ``x @ R.T``, lattice rows too."""
    rot = np.asarray(rotation, dtype=np.float64)
    out = dict(record)
    for key, spec in _specs(record).items():
        if spec.transform in ("points", "lattice"):
            arr = np.asarray(record[key])
            out[key] = (arr.astype(np.float64) @ rot.T).astype(arr.dtype)
    return out


def translate(record: Record, shift: Sequence[float] | np.ndarray) -> Record:
    """The record with every point moved by ``shift`` (3,) Angstrom (the lattice is unchanged)."""
    t = np.asarray(shift, dtype=np.float64).reshape(3)
    out = dict(record)
    for key, spec in _specs(record).items():
        if spec.transform == "points":
            arr = np.asarray(record[key])
            out[key] = (arr.astype(np.float64) + t).astype(arr.dtype)
    return out


def random_permutation(record: Record, seed: int) -> np.ndarray:
    """A random order (N,) of the record's atoms that moves at least one atom (N > 1)."""
    n = len(record[R.Z])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while n > 1 and np.array_equal(perm, np.arange(n)):
        perm = rng.permutation(n)
    return perm


def _edge_order(record: Record, specs: dict[str, R.ArraySpec], index_key: str) -> np.ndarray:
    """Canonical order of an edge list: by (dst, src) then its aligned image columns."""
    idx = np.asarray(record[index_key])
    symbol = specs[index_key].dims[1]
    keys = []
    for key, spec in specs.items():
        if spec.transform == "image" and spec.dims[0] == symbol:
            img = np.asarray(record[key])
            keys += [img[:, 2], img[:, 1], img[:, 0]]
    return np.lexsort(keys + [idx[0], idx[1]])


def permute(record: Record, perm: Sequence[int] | np.ndarray) -> Record:
    """The same structure with its atoms relabelled: new atom ``i`` is old atom ``perm[i]``.

    Per-atom axes (``N`` in the schema shape) are reordered, atom-index arrays are remapped, and
    each edge list is then sorted by (dst, src, image) with the arrays aligned with it (edge
    features, images), which reorders edges without changing the graph.
    """
    specs = _specs(record)
    perm = np.asarray(perm, dtype=np.int64)
    n = len(record[R.Z])
    if sorted(perm.tolist()) != list(range(n)):
        raise ValueError(f"perm is not a permutation of the {n} atoms")
    new_index = np.empty(n, dtype=np.int64)
    new_index[perm] = np.arange(n)
    out = dict(record)
    for key, spec in specs.items():
        if spec.is_meta:
            continue
        arr = np.asarray(record[key])
        if "N" in spec.dims:
            arr = np.take(arr, perm, axis=spec.dims.index("N"))
        if spec.transform == "atom_index":
            arr = new_index[arr].astype(arr.dtype)
        out[key] = arr
    for key, spec in specs.items():
        if spec.transform != "atom_index":
            continue
        order = _edge_order(out, specs, key)
        symbol = spec.dims[1]
        for other, ospec in specs.items():
            if not ospec.is_meta and symbol in ospec.dims:
                out[other] = np.take(out[other], order, axis=ospec.dims.index(symbol))
    return out


def batch_node_order(perms: Sequence[np.ndarray]) -> np.ndarray:
    """Node index map of a batch of permuted records.

    Args:
        perms: the permutation (N_i,) applied to each record of the batch, in batch order.
    Returns:
        (sum N_i,) int64: node ``k`` of the permuted batch is node ``order[k]`` of the original
        batch, so per-node outputs compare as ``nodes[order] == nodes_permuted``.
    """
    sizes = [len(p) for p in perms]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if not perms:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(p, dtype=np.int64) + o for p, o in zip(perms, offsets)])


def _crystal_settings(cfg: PreprocessConfig | dict[str, Any]) -> tuple[float, int, float]:
    """(cutoff, max_neighbors, tie_tolerance) from a config or a featurisation spec dict."""
    if isinstance(cfg, PreprocessConfig):
        return cfg.crystal.cutoff, cfg.crystal.max_neighbors, cfg.crystal.tie_tolerance
    return float(cfg["crystal_cutoff"]), int(cfg["crystal_max_neighbors"]), float(cfg.get("crystal_tie_tolerance") or 0.0)


def _rederive_neighbours(out: Record, cfg: PreprocessConfig | dict[str, Any]) -> Record:
    cutoff, max_neighbors, tie = _crystal_settings(cfg)
    src, dst, image = crystal_neighbours(out[R.POS], out[R.CELL], cutoff, max_neighbors, tie)
    out[R.NBR_INDEX] = np.stack([src, dst]).astype(np.int32)
    out[R.NBR_IMAGE] = image.astype(np.int8)
    return out


def supercell(record: Record, size: Sequence[int] | np.ndarray, cfg: PreprocessConfig | dict[str, Any]) -> Record:
    """Another cell of the same crystal: ``size`` (na, nb, nc) repeats, or an integer (3, 3) matrix ``M``.

    The new lattice is ``M @ cell`` (rows); a unimodular ``M`` is a change of basis with the same
    atoms. Atoms are copied for every lattice translation inside the new cell (copy-major: new
    atom ``c * N + i`` is atom ``i`` of copy ``c``), per-atom arrays are tiled, and the neighbour
    lists are re-derived from the arrays with the crystal settings of ``cfg`` (a
    :class:`PreprocessConfig` or a featurisation spec dict), as preprocessing would.

    Raises:
        ValueError: not a crystal, a singular matrix, or an array the helper cannot rebuild.
    """
    specs = _specs(record)
    if R.CELL not in record:
        raise ValueError(f"record {record.get(R.ID)!r} has no cell; supercells are for crystals")
    if R.GRID_VALUES in record:
        # the grid would need its values tiled over the new cell, which this helper does not do
        raise ValueError(f"record {record.get(R.ID)!r} carries a density grid; supercells of density records "
                         "are not supported")
    m = np.asarray(size, dtype=np.int64)
    m = np.diag(m) if m.shape == (3,) else m
    if m.shape != (3, 3) or round(abs(np.linalg.det(m))) == 0:
        raise ValueError(f"size must be 3 positive repeats or a non-singular integer 3x3 matrix, got {size!r}")
    # lattice translations (in old-cell units) that lie inside the new cell: the corners of the
    # new cell bound them, and their fractional coordinates in the new cell lie in [0, 1)
    corners = np.array(list(itertools.product((0, 1), repeat=3))) @ m
    ranges = [range(int(lo), int(hi) + 1) for lo, hi in zip(corners.min(0), corners.max(0))]
    grid = np.array(list(itertools.product(*ranges)), dtype=np.float64)
    frac = grid @ np.linalg.inv(m.astype(np.float64))
    inside = np.all((frac > -1e-9) & (frac < 1 - 1e-9), axis=1)
    translations = grid[inside]
    copies = len(translations)
    if copies != round(abs(np.linalg.det(m))):
        raise ValueError(f"found {copies} lattice translations for a supercell of volume {abs(np.linalg.det(m)):.0f}")
    cell = np.asarray(record[R.CELL], dtype=np.float64)
    shift = translations @ cell                                                      # (C, 3)
    out = dict(record)
    for key, spec in specs.items():
        if spec.is_meta or key in (R.NBR_INDEX, R.NBR_IMAGE):
            continue
        arr = np.asarray(record[key])
        if spec.transform in ("atom_index", "image"):
            raise ValueError(f"supercell cannot rebuild '{key}'")
        if spec.transform == "lattice":
            out[key] = (m.astype(np.float64) @ arr).astype(arr.dtype)
        elif "N" in spec.dims and spec.transform == "points":
            moved = [arr.astype(np.float64) + s for s in shift]
            out[key] = np.concatenate(moved, axis=spec.dims.index("N")).astype(arr.dtype)
        elif "N" in spec.dims:
            out[key] = np.concatenate([arr] * copies, axis=spec.dims.index("N"))
    return _rederive_neighbours(out, cfg)


def wrap(record: Record) -> Record:
    """The crystal with every atom moved into the cell (fractional coordinates in [0, 1)).

    The edges stay the same: each image offset absorbs the lattice vectors its atoms moved by,
    so every edge vector ``pos[src] + image @ cell - pos[dst]`` is unchanged.
    """
    _specs(record)
    if R.CELL not in record:
        raise ValueError(f"record {record.get(R.ID)!r} has no cell; only crystals can be wrapped")
    cell = np.asarray(record[R.CELL], dtype=np.float64)
    pos = np.asarray(record[R.POS], dtype=np.float64)
    moved = np.floor(pos @ np.linalg.inv(cell))                                      # (N, 3) whole cells
    out = dict(record, **{R.POS: pos - moved @ cell})
    if R.NBR_INDEX in record:
        src, dst = np.asarray(record[R.NBR_INDEX]).astype(np.int64)
        image = np.asarray(record[R.NBR_IMAGE]).astype(np.int64) + (moved[src] - moved[dst]).astype(np.int64)
        if np.abs(image).max(initial=0) > 127:
            raise ValueError("wrapped image offsets do not fit the int8 nbr_image")
        out[R.NBR_IMAGE] = image.astype(np.asarray(record[R.NBR_IMAGE]).dtype)
    return out


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _same(a: Record, b: Record) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


def assert_invariant(fn: Callable[[list[Record]], Any], records: Record | Sequence[Record],
                     transforms: Mapping[str, Callable[[Record], Record]] | Sequence[Callable[[Record], Record]],
                     atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Check that ``fn`` gives the same output for every transformed description of the records.

    Args:
        fn: list of records -> array (or tensor), e.g. a model's graph embeddings (B, D) of
            ``pipeline.graphs.collate(records)``.
        records: one record or a batch of them.
        transforms: record -> record, by name (or a sequence, named by position); each is
            applied to every record and ``fn`` is evaluated on the transformed batch.
        atol, rtol: tolerances of :func:`numpy.testing.assert_allclose`.
    Raises:
        AssertionError: an output differs (the message names the transform), or a transform left
            every record unchanged, so the check could not have failed.
    """
    batch = [records] if isinstance(records, dict) else list(records)
    named = dict(transforms) if isinstance(transforms, Mapping) else {f"transform {i}": t for i, t in enumerate(transforms)}
    ref = _as_array(fn(batch))
    for name, transform in named.items():
        moved = [transform(r) for r in batch]
        if all(_same(a, b) for a, b in zip(batch, moved)):
            raise AssertionError(f"{name} left every record unchanged, so the check could not fail")
        np.testing.assert_allclose(_as_array(fn(moved)), ref, atol=atol, rtol=rtol, err_msg=f"not invariant under {name}")
