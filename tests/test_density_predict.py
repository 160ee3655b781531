"""``molmat predict`` for density models (cubes on grids, values at points) and shipped models by name.

Real data only: the density model is trained here for two epochs on real QM9 density cubes (the
approach and settings of ``test_density_model.py``); structures are shipped QM9 xyz files and a
shipped Materials Project CIF; reference grids are the shipped Psi4 NH3 cube. Crystal models are
tiny random ones built in memory (invariance needs no training).
"""
from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DATASETS, ROOT, mp_cif_texts
from pipeline import MolmatError
from pipeline import records as R
from pipeline.checkpoint import DENSITY_MODEL, load_model_dir, read_model_config, save_model_dir
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.cube import BOHR_ANGSTROM, read_cube
from pipeline.preprocess import preprocess
from pipeline.promolecule import load_table, promolecule_density
from test_density_model import TINY, _cubes

XYZ = DATASETS / "qm9" / "xyz"
NH3_XYZ = XYZ / "dsgdb9nsd_000002.xyz"          # ammonia, the molecule of the Psi4 cube
MOLECULE_XYZ = XYZ / "dsgdb9nsd_002560.xyz"     # 10 atoms
REF_CUBE = DATASETS / "density" / "nh3_psi4_density.cube.gz"
PROPERTY_RUN = ROOT / "tests" / "data" / "legacy_v0_1" / "run_qm9_mpnn"
CRYSTAL_ID = "mp-1008676"                       # TiS2, hexagonal: a skewed cell
SPACING = 0.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory of a tiny density model trained on real QM9 cubes, its shard directory)."""
    from finetune.train import finetune

    base = tmp_path_factory.mktemp("density_predict")
    _cubes(base / "inputs")
    shards = base / "shards"
    preprocess([str(base / "inputs")], shards, load_config(None, TINY), workers=0)
    finetune(shards, base / "run", load_config(None, TINY))
    return base / "run", shards


@pytest.fixture(scope="module")
def crystal_cif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MP crystal (TiS2) as a CIF file."""
    path = tmp_path_factory.mktemp("crystal") / f"{CRYSTAL_ID}.cif"
    path.write_text(mp_cif_texts()[CRYSTAL_ID])
    return path


def _record(path: Path, model: torch.nn.Module) -> dict:
    from finetune.predict_density import structure_records

    recs = list(structure_records([str(path)], model.meta["preprocess"]))
    assert len(recs) == 1 and "_error" not in recs[0]
    return recs[0]


def _tiny_model(baseline: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny density model whose head matters (its last layer starts at zero otherwise)."""
    from finetune.density import build_density_model

    torch.manual_seed(seed)
    model = build_density_model(load_config(None, TINY + [f"density.baseline={baseline}"]).density)
    torch.nn.init.normal_(model.head[2].weight, std=0.5)
    torch.nn.init.normal_(model.head[2].bias, std=0.5)
    return model.eval()


def _crystal_model_dir(path: Path, baseline: str) -> Path:
    """A tiny random density model saved as a model directory that accepts crystals."""
    model = _tiny_model(baseline)
    cfg = load_config(None, TINY)
    return save_model_dir(path, model, DENSITY_MODEL, {
        "model": model.describe(), "density": cfg.density.model_dump(mode="json"),
        "preprocess": cfg.preprocess.model_dump(mode="json"), "kinds": ["crystal", "molecule"]})


def _predict(*args: str) -> int:
    return main(["predict", *map(str, args), "--set", "train.device=cpu"])


def _comment_value(line: str, key: str) -> float:
    return float(re.search(rf"\b{key}=(\S+)", line).group(1))


def _no_leftovers(folder: Path) -> None:
    """Nothing half-written: no temporary files beside the outputs."""
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------- grids
def test_grid_like_output_has_exactly_the_reference_grid(trained, tmp_path, capsys):
    run, _ = trained
    ref = read_cube(REF_CUBE)
    # REF's own atoms (no structure given): the same atoms block, the charge column included
    assert _predict(run, "--grid-like", REF_CUBE, "--out", tmp_path / "like.cube") == 0
    got = read_cube(tmp_path / "like.cube")
    for a, b in ((got.origin, ref.origin), (got.axes, ref.axes), (got.positions, ref.positions)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_array_equal(got.shape, ref.shape)
    np.testing.assert_array_equal(got.z, ref.z)
    np.testing.assert_array_equal(got.charges, ref.charges)
    out = capsys.readouterr().out
    assert f"at {int(np.prod(ref.shape)):,} points" in out and "probes/s" in out
    # a structure file gives the atoms, REF the grid
    assert _predict(run, NH3_XYZ, "--grid-like", REF_CUBE, "--out", tmp_path / "xyz_like.cube") == 0
    got = read_cube(tmp_path / "xyz_like.cube")
    model = load_model_dir(run, [DENSITY_MODEL])
    rec = _record(NH3_XYZ, model)
    np.testing.assert_allclose(got.origin, ref.origin, rtol=0, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_allclose(got.axes, ref.axes, rtol=0, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_array_equal(got.shape, ref.shape)
    np.testing.assert_array_equal(got.z, rec[R.Z])
    np.testing.assert_allclose(got.positions, rec[R.POS], rtol=0, atol=1e-6 * BOHR_ANGSTROM)
    _no_leftovers(tmp_path)


def test_grid_spacing_cube_reads_back_with_the_predicted_values(trained, tmp_path, capsys):
    from pymatgen.io.common import VolumetricData

    from finetune.density import densities_at

    run, _ = trained
    out = tmp_path / "rho.cube"
    assert _predict(run, MOLECULE_XYZ, "--grid-spacing", SPACING, "--grid-stride", 1, "--out", out) == 0
    printed = capsys.readouterr().out
    model = load_model_dir(run, [DENSITY_MODEL])
    rec = _record(MOLECULE_XYZ, model)
    cube = read_cube(out)
    pos = np.asarray(rec[R.POS], dtype=np.float64)
    margin = 4.0 * BOHR_ANGSTROM
    # the box: 4 bohr beyond the atoms, step SPACING along x, y, z, reaching at least max + margin
    np.testing.assert_allclose(cube.origin, pos.min(axis=0) - margin, atol=1e-5)
    np.testing.assert_allclose(cube.axes, np.eye(3) * SPACING, atol=1e-6)
    far = cube.origin + (cube.shape - 1) * SPACING
    assert (far >= pos.max(axis=0) + margin - 1e-5).all() and (far - SPACING < pos.max(axis=0) + margin).all()
    np.testing.assert_array_equal(cube.z, rec[R.Z])
    # the points, made here from the header, and the model's densities there
    i, j, k = np.meshgrid(*[np.arange(n) for n in cube.shape], indexing="ij")
    points = (cube.origin + i[..., None] * cube.axes[0] + j[..., None] * cube.axes[1]
              + k[..., None] * cube.axes[2]).reshape(-1, 3)
    expected, _ = densities_at(model, rec, points)
    np.testing.assert_allclose(cube.values.reshape(-1), expected, rtol=6e-6, atol=1e-30)   # %13.5E keeps 6 digits
    pmg = VolumetricData.from_cube(str(out))
    np.testing.assert_array_equal(pmg.data["total"], cube.values)
    np.testing.assert_allclose(pmg.structure.lattice.matrix, cube.axes * cube.shape[:, None], atol=1e-5)
    assert len(pmg.structure) == len(rec[R.Z])
    # the electron count is the grid's Riemann sum, in the comment line and the printout
    voxel = np.linalg.det(cube.axes) / BOHR_ANGSTROM ** 3
    electrons = _comment_value(cube.comments[1], "electrons")
    assert electrons == pytest.approx(cube.values.sum() * voxel, rel=1e-5)
    assert 0.8 * rec[R.Z].sum() < electrons < 1.2 * rec[R.Z].sum()
    assert f"{electrons:.4f} electrons" in printed and f"at {points.shape[0]:,} points" in printed
    assert re.search(r"[\d,]+ probes/s", printed)
    # the default: the network on every 2nd point, log density splined between, direct near atoms
    fast = tmp_path / "fast.cube"
    assert _predict(run, MOLECULE_XYZ, "--grid-spacing", SPACING, "--out", fast) == 0
    approx = read_cube(fast).values.reshape(-1)
    near = np.linalg.norm(points[:, None, :] - pos[None, :, :], axis=-1).min(axis=1) < 1.0
    assert 0 < near.sum() < len(near)
    np.testing.assert_allclose(approx[near], expected[near], rtol=6e-6, atol=1e-30)
    assert np.abs(approx - expected).sum() / expected.sum() < 2e-3


def test_points_npy_and_csv_give_the_densities_at_those_points(trained, tmp_path):
    from finetune.density import densities_at

    run, _ = trained
    model = load_model_dir(run, [DENSITY_MODEL])
    rec = _record(MOLECULE_XYZ, model)
    rng = np.random.default_rng(0)
    pos = np.asarray(rec[R.POS])
    points = np.concatenate([pos + rng.normal(0, 0.3, pos.shape), pos.mean(0) + rng.uniform(-6, 6, (40, 3))])
    expected, _ = densities_at(model, rec, points)
    np.save(tmp_path / "p.npy", points)
    with_header = "X,Y,Z\n" + "".join(f"{x!r},{y!r},{z!r}\n" for x, y, z in points.tolist())
    (tmp_path / "header.csv").write_text(with_header)
    (tmp_path / "plain.csv").write_text(with_header.split("\n", 1)[1])
    assert _predict(run, MOLECULE_XYZ, "--points", tmp_path / "p.npy", "--out", tmp_path / "rho.npy") == 0
    np.testing.assert_allclose(np.load(tmp_path / "rho.npy"), expected, rtol=1e-12, atol=0)
    for name in ("header.csv", "plain.csv"):
        out = tmp_path / f"rho_{name}"
        assert _predict(run, MOLECULE_XYZ, "--points", tmp_path / name, "--out", out) == 0
        lines = out.read_text().splitlines()
        assert lines[0] == "x,y,z,rho_e_per_bohr3" and len(lines) == len(points) + 1
        table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
        np.testing.assert_array_equal(table[:, :3], points)
        np.testing.assert_allclose(table[:, 3], expected, rtol=1e-12, atol=0)
    _no_leftovers(tmp_path)


def _far_points(pos: np.ndarray, low: float, high: float, n: int = 400, seed: int = 0) -> np.ndarray:
    """Points whose nearest atom is between ``low`` and ``high`` Angstrom away."""
    rng = np.random.default_rng(seed)
    centre = pos.mean(axis=0)
    reach = np.linalg.norm(pos - centre, axis=1).max()
    cand = centre + rng.normal(size=(20 * n, 3))
    cand = centre + (cand - centre) / np.linalg.norm(cand - centre, axis=1, keepdims=True) * rng.uniform(
        low, high + reach, (len(cand), 1))
    nearest = np.linalg.norm(cand[:, None] - pos[None], axis=-1).min(axis=1)
    keep = cand[(nearest > low) & (nearest < high)][:n]
    assert len(keep) >= 20
    return keep


def _isolated_constant(model: torch.nn.Module) -> float:
    """The head's output for a probe with no atom within the cutoff: it receives no messages, so its
    state is the learned start ``p0`` through each layer's PaiNN update alone."""
    with torch.no_grad():
        p = model.p0[None]
        q = p.new_zeros(3, 1, p.shape[1])
        for layer in model.layers:
            p, q = layer.update(p, q)
        return float(model.head(model.norm(p)))


def test_probes_beyond_the_cutoff_get_the_vacuum_value(trained):
    from finetune.density import build_density_model
    from finetune.predict_density import predict_points

    run, _ = trained
    softplus = lambda x: np.logaddexp(0.0, x)                        # noqa: E731
    inverse_softplus = lambda y: y + np.log(-np.expm1(-y))           # noqa: E731
    trained_model = load_model_dir(run, [DENSITY_MODEL])
    rec = _record(MOLECULE_XYZ, trained_model)
    pos = np.asarray(rec[R.POS], dtype=np.float64)
    table = load_table()
    cutoff, reach = trained_model.cutoff, table.radius_angstrom
    assert reach > cutoff + 0.1
    # between the cutoff and the free-atom table's reach: no messages, only the promolecule
    shell = _far_points(pos, cutoff + 0.02, reach - 0.02)
    promolecule = promolecule_density(table, rec[R.Z], pos, shell)
    assert (promolecule > 0).all()
    untrained = build_density_model(load_config(None, TINY).density).eval()   # its head's constant is 0
    pred, _ = predict_points(untrained, rec, shell)
    np.testing.assert_allclose(pred, promolecule, rtol=1e-4)
    # a trained network adds one constant for every isolated probe: softplus(softplus^-1(promolecule) + c)
    c = _isolated_constant(trained_model)
    pred, _ = predict_points(trained_model, rec, shell)
    np.testing.assert_allclose(pred, softplus(inverse_softplus(promolecule) + c), rtol=1e-4)
    # beyond the table's reach the promolecule is 0 and so, within float32's floor, is the density
    pred, _ = predict_points(trained_model, rec, _far_points(pos, reach + 0.05, reach + 3.0))
    assert (pred < 1e-25).all()
    # without a baseline: every isolated probe gets softplus of the same constant
    model = _tiny_model("none")
    pred, _ = predict_points(model, rec, _far_points(pos, model.cutoff + 0.02, model.cutoff + 3.0))
    np.testing.assert_allclose(pred, softplus(_isolated_constant(model)), rtol=1e-6)
    inside, _ = predict_points(model, rec, pos + 0.5)
    assert np.ptp(inside) > 1e-4   # and probes near atoms are not all that constant


# ---------------------------------------------------------------------------------- crystals
def test_periodic_density_is_the_same_at_lattice_translations(crystal_cif):
    from finetune.predict_density import predict_points, structure_records

    model = _tiny_model("none")
    rec = next(structure_records([str(crystal_cif)], load_config(None, TINY).preprocess.model_dump(mode="json")))
    cell = np.asarray(rec[R.CELL], dtype=np.float64)
    frac = np.random.default_rng(1).uniform(0, 1, (30, 3))
    points = frac @ cell
    ref, _ = predict_points(model, rec, points)
    assert np.ptp(ref) > 1e-4
    for shift in ([1, 0, 0], [0, -1, 2], [-2, 1, -1]):
        moved, _ = predict_points(model, rec, points + np.array(shift, dtype=np.float64) @ cell)
        np.testing.assert_allclose(moved, ref, rtol=1e-4, atol=1e-7, err_msg=str(shift))


def test_crystal_cube_tiles_the_cell_with_skewed_axes(crystal_cif, tmp_path):
    from finetune.predict_density import predict_points, structure_records

    run = _crystal_model_dir(tmp_path / "model", "none")
    out = tmp_path / "tis2.cube"
    assert _predict(run, crystal_cif, "--grid-spacing", 0.3, "--grid-stride", 1, "--out", out) == 0
    cube = read_cube(out)
    model = load_model_dir(run, [DENSITY_MODEL])
    rec = next(structure_records([str(crystal_cif)], model.meta["preprocess"]))
    cell = np.asarray(rec[R.CELL], dtype=np.float64)
    np.testing.assert_array_equal(cube.shape, np.ceil(np.linalg.norm(cell, axis=1) / 0.3).astype(int))
    np.testing.assert_allclose(cube.shape[:, None] * cube.axes, cell, atol=1e-5)   # n_i * axis_i = a_i
    np.testing.assert_allclose(cube.origin, 0.0, atol=1e-9)
    cos = cube.axes[0] @ cube.axes[1] / np.linalg.norm(cube.axes[0]) / np.linalg.norm(cube.axes[1])
    assert cos == pytest.approx(-0.5, abs=1e-4)                                   # 120 degrees: skewed
    np.testing.assert_array_equal(cube.z, rec[R.Z])
    # the first voxel plane and the one a cell further along axis 0 (outside the cube) agree
    plane = cube.values[0].reshape(-1)
    j, k = np.meshgrid(np.arange(cube.shape[1]), np.arange(cube.shape[2]), indexing="ij")
    next_cell = cell[0] + j.reshape(-1, 1) * cube.axes[1] + k.reshape(-1, 1) * cube.axes[2]
    pred, _ = predict_points(model, rec, next_cell)
    np.testing.assert_allclose(plane, pred, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_give_one_line_naming_the_file(trained, crystal_cif, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "out.cube"

    def error(*args: str) -> str:
        capsys.readouterr()
        assert _predict(*args) == 2
        msg = capsys.readouterr().err
        assert msg.startswith("molmat: error: ") and msg.count("\n") == 1
        assert not out.exists()
        _no_leftovers(tmp_path)
        return msg

    assert "nothere.xyz: no such file" in error(run, tmp_path / "nothere.xyz", "--out", out)
    broken = tmp_path / "broken.xyz"
    broken.write_text("\n".join(NH3_XYZ.read_text().splitlines()[:3]) + "\n")   # truncated real file
    assert "broken.xyz" in error(run, broken, "--out", out)
    msg = error(PROPERTY_RUN, NH3_XYZ, "--grid-spacing", "0.2", "--out", out)
    assert "property model; --grid-spacing is for density models only" in msg
    assert "x.csv" in error(run, NH3_XYZ, "--out", tmp_path / "x.csv")
    np.save(tmp_path / "flat.npy", np.zeros((5, 2)))
    msg = error(run, NH3_XYZ, "--points", tmp_path / "flat.npy", "--out", tmp_path / "rho.npy")
    assert "flat.npy" in msg and "(5, 2)" in msg and not (tmp_path / "rho.npy").exists()
    (tmp_path / "bad.csv").write_text("x,y,z\n1,2,3\n4,5\n")
    assert "bad.csv, line 3" in error(run, NH3_XYZ, "--points", tmp_path / "bad.csv", "--out", tmp_path / "rho.csv")
    assert "--grid-like" in error(run, NH3_XYZ, "--grid-like", REF_CUBE, "--grid-spacing", "0.2", "--out", out)
    msg = error(run, NH3_XYZ, MOLECULE_XYZ, "--out", out)
    assert "holds 2 structures" in msg and "directory" in msg
    # a crystal for a model trained on molecules; an element its promolecule table lacks
    assert f"{crystal_cif.name}: model was trained on molecules" in error(run, crystal_cif, "--out", out)
    crystal_run = _crystal_model_dir(tmp_path / "promolecule_model", "promolecule")
    msg = error(crystal_run, crystal_cif, "--out", out)
    assert crystal_cif.name in msg and "no free-atom density for" in msg


def test_a_directory_out_gets_one_cube_per_structure(trained, tmp_path, capsys):
    run, _ = trained
    broken = tmp_path / "broken.xyz"
    broken.write_text("\n".join(NH3_XYZ.read_text().splitlines()[:3]) + "\n")
    assert _predict(run, NH3_XYZ, broken, NH3_XYZ, "--grid-spacing", "0.4", "--out", f"{tmp_path / 'cubes'}/") == 0
    assert sorted(p.name for p in (tmp_path / "cubes").iterdir()) == ["000002.cube", "000002_2.cube"]
    assert "broken.xyz" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shipped models
def test_shipped_models_load_by_name(trained, tmp_path, monkeypatch, capsys):
    import pipeline.shipped as shipped

    run, shards = trained
    models = tmp_path / "models"
    shutil.copytree(run / "best", models / "tiny-density")
    (models / "tiny-density" / "CARD.md").write_text("# tiny-density\nA test model.\n")
    monkeypatch.setattr(shipped, "MODELS_DIR", models)
    monkeypatch.chdir(tmp_path)
    assert shipped.shipped_models() == ["tiny-density"]
    assert shipped.resolve_model("tiny-density") == models / "tiny-density"
    assert shipped.resolve_model(run) == run                      # a path is a path
    model = load_model_dir("tiny-density")
    assert model.meta["format"] == DENSITY_MODEL
    # a stray folder of that name that is no model directory does not hide the shipped model
    (tmp_path / "tiny-density").mkdir()
    assert read_model_config("tiny-density")[0] == models / "tiny-density"
    with pytest.raises(MolmatError, match=r"no-such-model: .*shipped models: tiny-density"):
        load_model_dir("no-such-model")
    assert _predict("tiny-density", NH3_XYZ, "--grid-spacing", "0.4", "--out", tmp_path / "nh3.cube") == 0
    assert "model=tiny-density" in read_cube(tmp_path / "nh3.cube").comments[0]
    assert main(["evaluate", "tiny-density", "--data", str(shards), "--set", "train.device=cpu"]) == 0
    assert (tmp_path / "eval_tiny-density_test" / "metrics.json").is_file()
    assert not (models / "tiny-density" / "eval_test").exists()
    assert main(["predict", "no-such-model", str(NH3_XYZ), "--out", str(tmp_path / "x.cube")]) == 2
    assert "shipped models: tiny-density" in capsys.readouterr().err
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    assert {"data/models/*/*.json", "data/models/*/*.safetensors", "data/models/*/*.md"} <= set(data)


# ------------------------------------------------------------------------- the shipped model
@pytest.mark.parametrize("model", ["qm9-density", "qm9-density-fast"])
@pytest.mark.parametrize("name", ["qm9_021368.npz", "qm9_128873.npz"])
def test_shipped_qm9_density_matches_an_exact_dft_density_of_an_unseen_molecule(name, model, tmp_path):
    """qm9-density (and its fast sibling) against the exact PBE/def2-SVP density (PySCF, from the density matrix, no grid)
    of QM9 molecules outside its training labels (QM9 indices 2-5949), on a box of its own making:
    the CLI writes the cube, PySCF evaluates the same points independently."""
    pytest.importorskip("pyscf", reason="PySCF is an optional extra: pip install molmat[density]")
    from pipeline.density_labels import load_density_matrix
    from pipeline.elements import element_symbol
    from pipeline.shipped import shipped_models

    assert model in shipped_models()
    dm = load_density_matrix(DATASETS / "density" / name)
    xyz = tmp_path / "mol.xyz"
    xyz.write_text(f"{len(dm.z)}\n{name}\n" + "".join(
        f"{element_symbol(int(z))} {x!r} {y!r} {w!r}\n" for z, (x, y, w) in zip(dm.z, dm.pos_angstrom.tolist())))
    out = tmp_path / "rho.cube"
    assert _predict(model, xyz, "--grid-spacing", 0.25, "--out", out) == 0
    cube = read_cube(out)
    i, j, k = np.meshgrid(*[np.arange(n) for n in cube.shape], indexing="ij")
    points = (cube.origin + i[..., None] * cube.axes[0] + j[..., None] * cube.axes[1]
              + k[..., None] * cube.axes[2]).reshape(-1, 3)
    exact = dm.density(points)
    pred = cube.values.reshape(-1)
    nmae = 100 * np.abs(pred - exact).sum() / exact.sum()
    # held-out QM9 test molecules: 0.23-1.0% (bench/results/density.md); the promolecule alone ~11%
    print(f"{model} {name}: NMAE {nmae:.3f}%, electrons {pred.sum() / exact.sum() - 1:+.4%}")
    assert nmae < 1.5, nmae
    assert pred.sum() == pytest.approx(exact.sum(), rel=0.01)   # the same points' electron count within 1%


def test_evaluate_of_a_shipped_name_writes_here_not_into_the_package(tmp_path):
    from finetune.modeldata import default_eval_out

    assert default_eval_out("qm9-density", "test") == Path("eval_qm9-density_test")
    assert default_eval_out(tmp_path / "run", "val") == tmp_path / "run" / "eval_val"
