"""Checkpoints: a directory with ``model.safetensors``, ``graph.json`` and ``manifest.json``.

The manifest records the format version, the library versions that wrote it, the
source model class and config, every pass applied with its config, the structural
edits, graph metadata, and a SHA-256 of each file. Loading never unpickles: the
graph is rebuilt from JSON, the tensors come from safetensors. Saving writes into a
temporary directory beside the target and renames it into place, so a crash never
leaves a half-written checkpoint at the target path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import safetensors.torch
import torch

from .calls import upgrade_model_call
from .errors import CheckpointError, LoweredForAnotherCPU
from .runtime import machine_mismatch
from .serialize import graph_from_json, graph_to_json
from .shapes import propagate_shapes

FORMAT = "graphprune-checkpoint"
FORMAT_VERSION = 2  # 2: graph.json records the model's call signature ("call")
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.json"
TENSOR_FILE = "model.safetensors"


def package_version(package: str) -> str | None:
    """An installed package's version, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def process_rank() -> int:
    """This process's rank in a distributed run (0 when alone).

    From torch.distributed once its process group is up, else from ``RANK``, which
    ``accelerate launch`` and ``torchrun`` set for every process they start.
    """
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_writer_rank() -> bool:
    """False in the processes of a distributed run other than rank 0."""
    return process_rank() == 0


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(graph, path) -> None:
    """Save a ``Graph`` to the directory ``path`` (replacing an earlier checkpoint there).

    In a run of several processes (``accelerate launch``, torch.distributed) only rank 0
    writes, as ``accelerate.Accelerator.save`` does: every rank holds the same graph, and
    several writers of one directory would race.
    """
    if not is_writer_rank():
        return
    path = Path(path)
    if path.exists() and not (path.is_dir() and (path / MANIFEST).is_file()):
        raise CheckpointError(f"{path} exists and is not a graphprune checkpoint; refusing to overwrite it")
    body, tensors = graph_to_json(graph.module)  # fails before anything is written
    graph_bytes = json.dumps(body).encode()
    tensor_bytes = safetensors.torch.save(tensors, metadata={"format": "pt", "writer": "graphprune"})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: package_version(name) for name in ("graphprune", "torch", "transformers", "safetensors")},
        "source": graph.source,
        "history": graph.history,
        "edits": graph.edits,
        "meta": graph.meta,
        "files": {
            GRAPH_FILE: {"sha256": hashlib.sha256(graph_bytes).hexdigest(), "bytes": len(graph_bytes)},
            TENSOR_FILE: {"sha256": hashlib.sha256(tensor_bytes).hexdigest(), "bytes": len(tensor_bytes)},
        },
    }
    try:
        manifest_bytes = json.dumps(manifest, indent=2).encode()
    except TypeError as error:
        raise CheckpointError(f"cannot save: graph metadata is not JSON-able ({error})") from error

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:8]}"
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _write(staging / TENSOR_FILE, tensor_bytes)
        _write(staging / GRAPH_FILE, graph_bytes)
        _write(staging / MANIFEST, manifest_bytes)  # last: a directory without it is not a checkpoint
        if path.exists():
            path.rename(backup)
        staging.rename(path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if backup.exists() and not path.exists():
            backup.rename(path)  # put the earlier checkpoint back
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot save checkpoint to {path}: {error}") from error
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: not a directory")
    if not file.is_file():
        raise CheckpointError(f"{path} is not a graphprune checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is corrupted (not valid JSON: {error}); the checkpoint may be truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a graphprune manifest")
    fmt = manifest.get("format_version")
    if not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{file} has an invalid format_version {fmt!r}")
    if fmt > FORMAT_VERSION:
        written_by = (manifest.get("versions") or {}).get("graphprune")
        raise CheckpointError(
            f"{path} uses checkpoint format {fmt} (written by graphprune {written_by}); this graphprune "
            f"reads formats up to {FORMAT_VERSION}: upgrade graphprune to load it"
        )
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file} lists no files")
    return manifest


def _read_checked(path: Path, name: str, manifest: dict) -> bytes:
    expected = manifest["files"].get(name)
    file = path / name
    if not isinstance(expected, dict) or "sha256" not in expected:
        raise CheckpointError(f"{path / MANIFEST} has no checksum for {name}")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    data = file.read_bytes()
    if len(data) != expected.get("bytes") or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(
            f"{file} does not match its checksum in {MANIFEST} ({len(data)} bytes, expected {expected.get('bytes')}): "
            "the file is truncated, corrupted or was modified"
        )
    return data


def read_checkpoint(path) -> dict:
    """The parts of a ``Graph`` saved at ``path``: ``module``, ``source``, ``meta``, ``history``, ``edits``.

    ``graphprune.load`` builds the ``Graph``; this module never needs the class.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    body = _read_checked(path, GRAPH_FILE, manifest)
    tensor_bytes = _read_checked(path, TENSOR_FILE, manifest)
    try:
        data = json.loads(body)
        tensors = safetensors.torch.load(tensor_bytes)
        module = graph_from_json(data, tensors)
        inputs = [n["input"] for n in data["nodes"] if n["op"] == "placeholder"]
        if manifest["format_version"] < 2:
            upgrade_model_call(module, manifest.get("source") or {})
    except CheckpointError:
        raise
    except Exception as error:  # checksums passed, so this is an inconsistent or foreign checkpoint
        raise CheckpointError(f"checkpoint {path} is inconsistent: {type(error).__name__}: {error}") from error
    try:
        propagate_shapes(module, inputs)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} loaded, but its graph does not run on symbolic inputs: {error}") from error
    mismatch = machine_mismatch(manifest.get("meta") or {})
    if mismatch:
        warnings.warn(f"graphprune.load({str(path)!r}): {mismatch}", LoweredForAnotherCPU, stacklevel=3)
    return {
        "module": module,
        "source": manifest.get("source") or {},
        "meta": manifest.get("meta") or {},
        "history": manifest.get("history") or [],
        "edits": manifest.get("edits") or [],
    }


def read_manifest(path) -> dict:
    """The manifest of a checkpoint, validated, without loading the graph."""
    return _read_manifest(Path(path))
