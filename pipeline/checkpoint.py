"""Model directories and training state: the one place that writes and reads weights.

A model directory holds ``config.json`` (what the directory is, everything needed to rebuild the
model and to featurise new inputs the same way) and ``model.safetensors`` (the weights:
bounds-checked, no code execution, the format people share weights in). The directory's
``format`` says what it holds; :data:`KINDS` maps each format to the builder of its model, so
loading needs no guess from file names. Directories written by molmat 0.1 (an older
``config.json`` layout and torch ``.pt`` weights) are translated on read and still load, with
``torch.load(weights_only=True)`` and a line saying to load only files you trust.

``last.pt`` (the full training state: weights, optimizer, schedule, loop position, RNG states)
stays torch-native; it is local resume state, written and read by the trainer only, and never
loaded from a directory handed to :func:`load_model_dir`.

Every file is written under a temporary name and renamed into place, so a reader never sees half a
file. The DDP unwrap is done here once (:func:`unwrap`).
"""
from __future__ import annotations

import ast
import collections
import io
import json
import logging
import os
import pickle  # only to check molmat 0.1 weight files before torch reads them (_LegacyScan); nothing is built
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from pipeline import FORMAT_VERSION, MolmatError, __version__
from pipeline.config import ModelConfig, upgrade_model_section

log = logging.getLogger("molmat.checkpoint")

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
#: Layout of config.json: 1 = molmat 0.1 (``model.encoder``, ``model.mpnn``, ``.pt`` weights).
LAYOUT = 2
PROPERTY_MODEL = "molmat-property-model"
ENCODER = "molmat-encoder"
DENSITY_MODEL = "molmat-density-model"
PROPERTY_ENSEMBLE = "molmat-property-ensemble"
#: Directory formats that predict properties: evaluation, prediction and curvature take either.
PROPERTY_MODELS = (PROPERTY_MODEL, PROPERTY_ENSEMBLE)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; others unchanged."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


# ------------------------------------------------------------------------------------ kinds
def _upgrade_property_model(config: dict[str, Any]) -> list[str]:
    return upgrade_model_section(config["model"], config.get("finetune"))


def _upgrade_encoder(config: dict[str, Any]) -> list[str]:
    # molmat 0.1 encoder directories always held both encoders, whatever model.encoder said
    model = config["model"]
    if "mpnn" not in model and "schnet" not in model:
        return []
    config["model"] = {"encoder2d": {**model.get("mpnn", {}), "name": "mpnn"},
                       "encoder3d": {**model.get("schnet", {}), "name": "schnet"}}
    return ["model.mpnn -> model.encoder2d", "model.schnet -> model.encoder3d"]


def _build_property_model(config: dict[str, Any]) -> nn.Module:
    from pipeline.models.property import PropertyModel

    return PropertyModel.from_config(config)


def _build_encoder_pair(config: dict[str, Any]) -> nn.Module:
    from pipeline.models.contrastive import ContrastiveModel

    return ContrastiveModel.from_config(config)


def _build_density_model(config: dict[str, Any]) -> nn.Module:
    from pipeline.models.density import DensityModel

    return DensityModel.from_config(config)


def _build_property_ensemble(config: dict[str, Any]) -> nn.Module:
    from pipeline.models.ensemble import PropertyEnsemble

    return PropertyEnsemble.from_config(config)


def _no_upgrade(config: dict[str, Any]) -> list[str]:
    # density model and ensemble directories exist only in the current layout
    return []


@dataclass(frozen=True)
class DirKind:
    """What a model directory of one ``format`` holds and how to rebuild it.

    Attributes:
        what: a few words for messages ("property model").
        build: ``config.json`` (current layout) -> randomly initialised module.
        upgrade: translates an older ``config.json`` layout in place; returns what it changed.
        legacy_weights: weights file name used by molmat 0.1 (torch pickle).
    """

    what: str
    build: Callable[[dict[str, Any]], nn.Module]
    upgrade: Callable[[dict[str, Any]], list[str]]
    legacy_weights: str


#: Directory format -> how to rebuild it. The density model adds its entry here.
KINDS: dict[str, DirKind] = {
    PROPERTY_MODEL: DirKind("property model", _build_property_model, _upgrade_property_model, "model.pt"),
    ENCODER: DirKind("pretrained encoder", _build_encoder_pair, _upgrade_encoder, "encoder.pt"),
    DENSITY_MODEL: DirKind("density model", _build_density_model, _no_upgrade, "density.pt"),
    PROPERTY_ENSEMBLE: DirKind("property model ensemble", _build_property_ensemble, _no_upgrade, "ensemble.pt"),
}


# ------------------------------------------------------------------------------ directories
def resolve_model_dir(path: str | Path) -> Path:
    """A run directory's ``best/`` when it has one, else the path itself; a shipped model's name
    (:mod:`pipeline.shipped`, e.g. ``qm9-density``) gives that model's directory.

    Raises:
        MolmatError: neither an existing path nor a shipped model's name.
    """
    from pipeline.shipped import resolve_model

    p = resolve_model(path)
    return p / "best" if (p / "best" / CONFIG).exists() else p


def read_model_config(path: str | Path, kinds: Iterable[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Read (and translate to the current layout) a model directory's ``config.json``.

    Args:
        path: model directory, a run directory with ``best/``, or a shipped model's name.
        kinds: accepted formats (default: any in :data:`KINDS`).
    Returns:
        (the model directory, its config as plain data).
    Raises:
        MolmatError: not a model directory, unreadable config, or a kind not accepted here.
    """
    d = resolve_model_dir(path)
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise MolmatError(f"{path}: not a molmat model directory ({CONFIG} is missing; expected the output of "
                          "`molmat finetune` or `molmat pretrain`)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MolmatError(f"{cfg_path}: unreadable ({exc})") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    accepted = list(kinds) if kinds is not None else list(KINDS)
    if fmt not in KINDS or fmt not in accepted:
        wanted = " or ".join(KINDS[k].what for k in accepted if k in KINDS)
        got = KINDS[fmt].what if fmt in KINDS else f"format {fmt!r}"
        raise MolmatError(f"{d}: holds a {got}, but a {wanted} is needed here")
    notes = KINDS[fmt].upgrade(config)
    if notes:
        log.info("%s: written by molmat %s in an older layout; translated (%s)", d, config.get("code_version", "?"),
                 "; ".join(notes))
    return d, config


def save_model_dir(path: str | Path, model: nn.Module, kind: str, meta: dict[str, Any]) -> Path:
    """Write a model directory: ``model.safetensors``, then ``config.json``, each atomically.

    Args:
        path: directory to create or update (e.g. ``RUN/best``).
        model: the model (a DDP wrapper is unwrapped).
        kind: a key of :data:`KINDS`.
        meta: the rest of ``config.json`` (architecture, targets, featurisation, ...); the
            format, layout and versions are added here.
    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown model directory kind {kind!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    try:
        save_file(state, str(tmp), metadata={"format": kind, "molmat": __version__})
        os.replace(tmp, out / WEIGHTS)
    except BaseException:  # a full disk: no temporary file left, the previous weights kept
        tmp.unlink(missing_ok=True)
        raise
    # a directory updated in place from an older run must not keep its old weights beside the new
    (out / KINDS[kind].legacy_weights).unlink(missing_ok=True)
    config = {"format": kind, "layout": LAYOUT, "format_version": FORMAT_VERSION, "code_version": __version__, **meta}
    tmp = out / (CONFIG + ".tmp")
    try:
        tmp.write_text(json.dumps(config, indent=1))
        os.replace(tmp, out / CONFIG)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


#: Bytes per element of the storage types a molmat 0.1 state dict may hold.
_STORAGE_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                     "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                     "BoolStorage": 1}


class _LegacyScan(pickle.Unpickler):
    """Reads the pickle of a torch zip file without building tensors, to check it first.

    Only what a molmat 0.1 state dict holds is allowed (an ``OrderedDict`` of
    ``_rebuild_tensor_v2`` tensors over typed storages); anything else is refused. Storages
    become ``(key, itemsize, numel)`` and tensors ``(storage, offset, size, stride)``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, size, stride)
        if module == "torch" and name in _STORAGE_ITEMSIZE:
            return name
        raise pickle.UnpicklingError(f"unexpected content {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_ITEMSIZE
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError("unexpected storage reference")
        return ("storage", pid[2], _STORAGE_ITEMSIZE[pid[1]], pid[4])


def check_legacy_weights(path: Path) -> None:
    """Check a molmat 0.1 ``.pt`` file before torch reads it: every tensor within its stored bytes.

    torch 2.2 trusts the sizes a file declares: a storage record shorter than its declared
    element count is read past its end, even with ``weights_only=True`` (heap bytes come back as
    weights, or the process crashes). Here the pickle is read with only a state dict's types
    allowed, and each storage's bytes in the zip and each tensor's view are checked against the
    declared sizes.

    Raises:
        MolmatError: naming the file and the first problem.
    """
    def bad(why: str) -> MolmatError:
        return MolmatError(f"{path}: not a sound molmat 0.1 weights file ({why}); it is damaged or crafted, do not "
                           "use it")

    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise bad("no single data.pkl record")
            prefix = pickles[0][: -len("data.pkl")]
            state = _LegacyScan(io.BytesIO(zf.read(pickles[0]))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError, RecursionError, MemoryError) as exc:
        raise bad(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(state, dict):
        raise bad("not a state dict")
    for name, value in state.items():
        if not (isinstance(value, tuple) and len(value) == 5 and value[0] == "tensor"):
            raise bad(f"entry {name!r} is not a tensor")
        _, storage, offset, size, stride = value
        if not (isinstance(storage, tuple) and storage[0] == "storage"):
            raise bad(f"tensor {name!r} has no storage")
        _, key, itemsize, numel = storage
        info = infos.get(f"{prefix}data/{key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * itemsize:
            found = "missing" if info is None else f"{info.file_size} bytes"
            raise bad(f"storage {key} of {name!r} declares {numel * itemsize} bytes, the file holds {found}")
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
            raise bad(f"tensor {name!r} has a malformed shape")
        last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else -1
        if last >= numel:
            raise bad(f"tensor {name!r} reaches element {last} of a storage of {numel}")


def load_weights(directory: Path, kind: str) -> dict[str, torch.Tensor]:
    """The state dict of a model directory (safetensors, or a molmat 0.1 ``.pt`` file).

    Raises:
        MolmatError: no weights file, or one that cannot be read.
    """
    path = directory / WEIGHTS
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MolmatError(f"{path}: not a readable safetensors file ({exc}); the file is damaged") from None
    legacy = directory / KINDS[kind].legacy_weights
    if legacy.is_file():
        log.warning("%s: torch weights file from molmat 0.1; checked, then loaded with weights_only=True, but "
                    "torch %s can still be exploited by a crafted file: load only files you trust (re-save with "
                    "molmat to get safetensors)", legacy, torch.__version__.split("+")[0])
        check_legacy_weights(legacy)
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or crafted files
            raise MolmatError(f"{legacy}: cannot be read as weights ({str(exc).splitlines()[0][:200]})") from None
    raise MolmatError(f"{directory}: no weights ({WEIGHTS}) beside {CONFIG}")


def load_model_dir(path: str | Path, kinds: Iterable[str] | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a model directory with its weights, strictly.

    Args:
        path: model directory, a run directory with ``best/``, or a shipped model's name
            (:mod:`pipeline.shipped`).
        kinds: accepted formats (default: any).
        device: where to put the model.
    Returns:
        The model in eval mode; ``model.meta`` holds its ``config.json`` (current layout).
    Raises:
        MolmatError: not a model directory of an accepted kind, or weights that do not fit it.
    """
    d, config = read_model_config(path, kinds)
    kind = config["format"]
    try:
        model = KINDS[kind].build(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise MolmatError(f"{d / CONFIG}: does not describe a {KINDS[kind].what} ({exc})") from None
    state = load_weights(d, kind)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MolmatError(f"{d}: weights do not fit the architecture in {CONFIG} ({str(exc).splitlines()[0]})") from None
    model.meta = config
    return model.to(device).eval()


# ---------------------------------------------------------------------- pretrained encoders
#: Directories whose encoders may start a fine-tuning (``--init``): pretrained encoder pairs, and
#: property models fine-tuned on other targets (transfer learning).
ENCODER_SOURCES = (ENCODER, PROPERTY_MODEL)


def pretrained_model_config(model_cfg: ModelConfig, path: str | Path,
                            replace: Iterable[str] = ()) -> tuple[ModelConfig, list[str]]:
    """The fine-tuning model config with the architecture of a pretrained encoder directory.

    The directory is a ``molmat pretrain`` encoder directory or a fine-tuned property model
    (transfer learning: e.g. a crystal encoder trained on the large MP formation-energy set
    started again on the few thousand elastic moduli); a property model lends its encoders only,
    never its heads. A pretrained encoder brings its architecture: each filled slot whose encoder is the one the
    directory holds for that view takes the directory's settings. Filled slots named in
    ``replace`` take the directory's encoder whatever it is: slots that were ``auto``, whose
    per-kind default (e.g. PaiNN for crystals) may differ from the encoder pretrained for that
    view (SchNet), since ``--init`` asks for the pretrained one.

    Returns:
        (the new model config, the slots that will be initialised from the directory).
    Raises:
        MolmatError: the directory is not an encoder directory, or no slot can use it.
    """
    _, config = read_model_config(path, ENCODER_SOURCES)
    data = model_cfg.model_dump(mode="json")
    slots = []
    for slot in ("encoder2d", "encoder3d"):
        theirs = config["model"].get(slot)
        ours = data.get(slot)
        if ours is not None and theirs is not None and (ours["name"] == theirs["name"] or slot in replace):
            data[slot] = theirs
            slots.append(slot)
    if not slots:
        held = {s: (config["model"].get(s) or {}).get("name", "nothing") for s in ("encoder2d", "encoder3d")}
        raise MolmatError(f"{path}: holds {held['encoder2d']} (2D) and {held['encoder3d']} (3D); "
                          "the model's slots use neither")
    return ModelConfig.model_validate(data), slots


def load_pretrained_encoders(model: nn.Module, path: str | Path, slots: list[str], shard_featurization: dict[str, Any],
                             kinds: Iterable[str]) -> None:
    """Copy a pretrained encoder directory's encoders into a model's slots.

    Args:
        model: a model with ``encoder2d`` / ``encoder3d`` attributes (a property model).
        path: the encoder directory (or a property model directory, whose encoders are taken).
        slots: the slots to fill (from :func:`pretrained_model_config`).
        shard_featurization: the fine-tuning shards' featurisation spec (manifest).
        kinds: record kinds of the fine-tuning shards.
    Raises:
        MolmatError: featurisation or architecture differs from the encoder directory's.
    """
    from pipeline.featurize import featurization_differences

    enc = load_model_dir(path, ENCODER_SOURCES)
    views = [getattr(model, s).cfg.view for s in slots]
    diff = featurization_differences(enc.meta["featurization"], shard_featurization, views, kinds)
    if diff:
        raise MolmatError(f"{path} was pretrained on another featurisation than the fine-tuning shards: "
                          + "; ".join(diff))
    for slot in slots:
        try:
            getattr(model, slot).load_state_dict(getattr(enc, slot).state_dict(), strict=True)
        except RuntimeError as exc:
            raise MolmatError(f"{path}: the pretrained {slot} does not fit the model's {slot} "
                              f"({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------- training state
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": repr(random.getstate())}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
    # repr of a tuple of ints and None: parsed back as a literal, never evaluated
    random.setstate(ast.literal_eval(rng["python"]))


def save_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        schedule: dict[str, Any], loop: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the full training state (``last.pt``) atomically.

    Args:
        path: the file (``RUN/last.pt``).
        model: the model (unwrapped here).
        optimizer: its optimizer.
        schedule: the learning-rate schedule's state.
        loop: the trainer's position (epoch, step, best metric, ...).
        extra: anything else to keep (train config, world size).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule,
             "state": dict(loop), "rng": _rng_state(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no last.pt.tmp left behind, the previous last.pt kept
        tmp.unlink(missing_ok=True)
        raise


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from ``last.pt``; return the rest of it.

    Returns:
        The checkpoint dict (``schedule``, ``state``, extras) for the trainer to apply.
    Raises:
        MolmatError: the file cannot be read or does not fit the model.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except Exception as exc:  # a damaged or foreign file raises anything from UnpicklingError to TypeError
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MolmatError(f"{path}: cannot resume from it ({first}); delete it, or pass --restart, to start "
                          "afresh") from None
    _set_rng_state(ckpt["rng"])
    return ckpt


def check_shards_fit(model_featurization: dict[str, Any], views: Iterable[str], manifest: dict[str, Any],
                     where: str) -> None:
    """Refuse shards made with a featurisation the model's encoders would read differently.

    Only the settings that matter for the model's graph views and the shards' record kinds are
    compared (:func:`pipeline.featurize.featurization_differences`): a 2D-only molecule model
    reads shards made with another 3D cutoff, a crystal model refuses another tie tolerance.

    Raises:
        MolmatError: naming each setting that differs and what to do.
    """
    from pipeline.featurize import featurization_differences
    from pipeline.shards import dataset_kinds

    diff = featurization_differences(model_featurization, manifest.get("featurization", {}), views,
                                     dataset_kinds(manifest))
    if diff:
        raise MolmatError(f"{where} was made with a different featurisation than the model: " + "; ".join(diff)
                          + ". Re-run preprocess with the model's settings.")


# ------------------------------------------------------------------------------ run identity
#: What a run directory's run is (data, targets, model), written when training starts.
RUN_IDENTITY = "run.json"
#: Where ``--restart`` moves the state of the run a directory held before.
PREVIOUS = "previous"
#: Files and directories of a run's state (moved aside together by ``--restart``).
RUN_STATE = ("last.pt", "best", "metrics.csv", "timing.json", "result.json", RUN_IDENTITY, "tensorboard",
             "learning_curve.png", CONFIG, WEIGHTS)


def data_identity(root: str | Path) -> dict[str, Any]:
    """What identifies a shard directory's content for a run: its dataset id and split.

    The manifest's ``dataset_id`` (or, for directories made before it, a hash of its inputs
    and settings) and a hash of ``split.json``, so a re-made dataset or split is noticed.
    """
    import hashlib

    from pipeline.shards import SPLIT, load_manifest

    manifest = load_manifest(root)
    ident = manifest.get("dataset_id") or hashlib.sha256(json.dumps(
        [manifest.get(k) for k in ("inputs", "preprocess", "featurization", "targets")], sort_keys=True).encode()
    ).hexdigest()
    split = Path(root) / SPLIT
    split_hash = hashlib.sha256(split.read_bytes()).hexdigest()[:16] if split.exists() else None
    return {"dataset": ident[:16], "records": manifest.get("records"), "split": split_hash}


def _old_identity(out: Path) -> dict[str, Any] | None:
    """The identity of the run ``out`` holds: its ``run.json``, or for runs from before it, what
    its model directory says (targets and model); None when nothing tells."""
    path = out / RUN_IDENTITY
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    for d in (out / "best", out):
        if (d / CONFIG).is_file():
            try:
                _, config = read_model_config(d)
            except MolmatError:
                return None
            old: dict[str, Any] = {"model": config.get("model")}
            if "targets" in config:
                old["targets"] = [t["name"] for t in config["targets"]]
            return old
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def prepare_run_dir(out: str | Path, identity: dict[str, Any], restart: bool = False, rank: int = 0,
                    world_size: int = 1) -> None:
    """Make a run directory resume only the run it holds, or start afresh when told to.

    Args:
        out: the run (or encoder) directory.
        identity: plain data saying what this run is (``data``, ``targets``, ``model``, ...).
        restart: move the directory's previous run state into ``out/previous/`` (replacing an
            older one there) and start afresh.
        rank, world_size: only rank 0 moves and writes; all ranks wait for it.
    Raises:
        MolmatError: ``out`` holds another run (other data, targets or model) and ``restart``
            is False; the message names what differs.
    """
    out = Path(out)
    identity = json.loads(json.dumps(identity))  # compared with what run.json gives back
    has_state = any((out / name).exists() for name in ("last.pt", "best", RUN_IDENTITY, CONFIG))
    if has_state and restart:
        if rank == 0:
            prev = out / PREVIOUS
            if prev.exists():
                import shutil

                shutil.rmtree(prev)
            prev.mkdir(parents=True)
            for name in RUN_STATE:
                if (out / name).exists():
                    os.replace(out / name, prev / name)
            log.info("--restart: the previous run's state in %s was moved to %s", out, prev)
    elif has_state:
        old = _old_identity(out)
        if old is not None:
            diff = [k for k in identity if k in old and old[k] != identity[k]]
            if diff:
                what = "; ".join(f"{k}: was {_short(old[k])}, now {_short(identity[k])}" for k in diff)
                raise MolmatError(f"{out} holds another run ({what}); use another --out, or pass --restart to move "
                                  f"that run's state to {out / PREVIOUS} and start afresh")
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank may look for last.pt before rank 0 has moved it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RUN_IDENTITY + ".tmp")
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
        os.replace(tmp, out / RUN_IDENTITY)
