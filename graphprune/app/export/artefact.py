"""Artefact folders: staged beside the target, checked, then renamed into place.

A folder holds the model file, the tokenizer files (where the graph records its
tokenizer), ``predict.py`` (a copy of :mod:`.standalone`, to run it without
graphprune) and ``artefact.json``: format, inputs and outputs, label names, source
model, the passes applied with their configs, versions, file sizes and hashes, the
check in a fresh process, accuracy once ``graphprune eval`` has measured it, and what
``predict.py`` reads texts by: ``max_length`` (the positions the model has),
``problem_type`` (a multi-label classifier's sigmoid), and for headless encoders
``embedding_pooling`` (mean, cls or max, as the source model records it) and ``normalize``.
Nothing appears at the target until the artefact has passed its check; an earlier
artefact there is replaced only then.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ...ir.checkpoint import package_version
from ...ir.errors import ExportError
from ...ir.graph import Graph
from .standalone import FORMAT, MANIFEST, read_manifest
from .standalone import __file__ as STANDALONE_FILE

FORMAT_VERSION = 1
SCRIPT = "predict.py"


@contextmanager
def staged_folder(path, caller: str):
    """Yield a fresh staging folder beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))):
        raise ExportError(f"{caller}: {path} exists and is not a graphprune artefact folder; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.exporting-{uuid.uuid4().hex[:8]}"
    backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            path.rename(backup)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup.exists() and not path.exists():
            backup.rename(path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_support_files(graph: Graph, folder: Path, tokenizer=None) -> bool:
    """The tokenizer files and ``predict.py``; returns whether a tokenizer was written."""
    shutil.copyfile(STANDALONE_FILE, folder / SCRIPT)
    if tokenizer is None and graph.source.get("tokenizer"):
        from ...training.models import load_tokenizer

        tokenizer = load_tokenizer(graph.source["tokenizer"])
    if tokenizer is None:
        return False
    tokenizer.save_pretrained(folder)
    return True


def label_names(graph: Graph) -> list[str]:
    """The class names, index = id: those the graph records (a job's label_names, the baseline's), else the config's."""
    id2label = (graph.source.get("config") or {}).get("id2label") or {}
    recorded = graph.source.get("label_names") or []
    if recorded and len(recorded) == len(id2label):
        return list(recorded)
    return [id2label[k] for k in sorted(id2label, key=int)]


# model types whose position ids start after the padding id (RoBERTa's numbering): that many fewer usable positions
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def usable_length(graph: Graph) -> int | None:
    """The longest input the model's position embeddings allow, None where the config does not say."""
    config = graph.source.get("config") or {}
    positions = config.get("max_position_embeddings")
    if positions and config.get("model_type") in OFFSET_POSITIONS:
        positions -= (config.get("pad_token_id") or 0) + 1
    return positions


def build_manifest(graph: Graph, folder: Path, *, artefact: str, model_file: str, inputs, outputs, task, **fields) -> dict:
    source = {k: graph.source.get(k) for k in ("model_class", "model_type", "tokenizer")}
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        files[str(file.relative_to(folder))] = {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artefact": artefact,
        "model_file": model_file,
        "model_bytes": files[model_file]["bytes"],
        "inputs": list(inputs),
        "outputs": list(outputs),
        "task": task,
        "labels": label_names(graph),
        "source": source,
        "passes": graph.history,
        "edits": len(graph.edits),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: package_version(name) for name in ("graphprune", "torch", "transformers", "onnx", "onnxruntime")},
        "accuracy": {},
        # how predict.py reads texts and pools embeddings; fields the exporter passes take precedence
        "max_length": usable_length(graph),
        "problem_type": (graph.source.get("config") or {}).get("problem_type"),
        "embedding_pooling": (graph.source.get("pooling") or "mean") if task is None else None,
        "normalize": bool(graph.source.get("normalize", False)),
        **fields,
        "files": files,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``artefact.json`` through a temporary file and a rename: never half-written."""
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / MANIFEST)


def record_accuracy(folder, key: str, metrics: dict) -> None:
    """Add a measured accuracy (``key`` like ``rotten_tomatoes/test``) to an artefact's manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest.setdefault("accuracy", {})[key] = metrics
    write_manifest(folder, manifest)
