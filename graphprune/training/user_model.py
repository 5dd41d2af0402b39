"""Users' own models: a ``save_pretrained`` folder, or a Hub id already in the local cache, traced.

    >>> from graphprune.training.user_model import inspect_model, load_model
    >>> inspect_model("runs/my-ner").task                  # from config.architectures
    'token-classification'
    >>> graph = load_model("runs/my-bert", task="text-classification", label_names=["neg", "pos"])
    >>> graph.source["tokenizer"], graph.source["label_names"]
    ('/abs/runs/my-bert', ['neg', 'pos'])
    >>> graph = load_model(hub="sentence-transformers/all-MiniLM-L6-v2")   # feature-extraction, from the cache

A base model given a head task gets a new head drawn under ``torch.manual_seed(seed)``.
Nothing is ever downloaded: ``hub=`` reads the local HF cache only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

PIPELINE_TASKS = ("text-classification", "token-classification", "question-answering", "feature-extraction")
# The families of README's "Supported models"; each traces with every head below.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra", "deberta-v2")
_HEAD_TASKS = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
}
# Architectures that are a backbone, possibly with a pretraining head that a task head replaces.
_BACKBONE_SUFFIXES = ("Model", "ForMaskedLM", "ForPreTraining")
_LABELLED_TASKS = ("text-classification", "token-classification")  # the tasks whose outputs are named classes
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "spm.model")
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds and how graphprune will load it (see :func:`inspect_model`)."""

    path: Path  # the resolved local folder
    task: str  # one of PIPELINE_TASKS
    architecture: str  # config.architectures[0], "" when the config lists none
    model_type: str
    has_head: bool  # the weights already hold the task's head
    label_names: tuple[str, ...] | None  # config.id2label in id order when a classification head is kept
    placeholder_labels: bool  # the names are HF's LABEL_n defaults
    pooling: str  # "mean", "cls" or "max"
    normalize: bool
    sentence_transformers: bool


def inspect_model(path=None, *, hub=None, task=None) -> ModelInfo:
    """Check a model folder (or cached Hub id) and work out its task, head, labels and pooling; loads no weights."""
    folder = _resolve(path, hub)
    _check_files(folder)
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{folder}: model_type {model_type!r} is not supported; graphprune loads {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"for the tasks {', '.join(PIPELINE_TASKS)}"
        )
    architecture = (config.get("architectures") or [""])[0]
    folder_task = _folder_task(folder, architecture)
    st_modules = _st_modules(folder)
    task = _choose_task(folder, task, architecture, folder_task, st_modules is not None)
    has_head = folder_task is not None
    labels = None
    if has_head and task in _LABELLED_TASKS:
        from transformers import AutoConfig

        id2label = AutoConfig.from_pretrained(folder).id2label  # fills HF's defaults when config.json has none
        labels = tuple(id2label[i] for i in sorted(id2label))
    pooling, normalize = _st_pooling(folder, st_modules) if st_modules is not None else ("mean", False)
    return ModelInfo(
        path=folder, task=task, architecture=architecture, model_type=model_type, has_head=has_head,
        label_names=labels, placeholder_labels=labels is not None and _placeholders(labels),
        pooling=pooling, normalize=normalize, sentence_transformers=st_modules is not None,
    )  # fmt: skip


def load_model(path=None, *, hub=None, task=None, label_names=None, num_labels=None, seed=0, log=print):
    """Load a model folder (or cached Hub id) for ``task`` and trace it into a ``Graph``.

    ``graph.source`` gains ``tokenizer`` (the folder, for ``load_tokenizer``), ``task``,
    ``label_names``, ``pooling`` and ``normalize``; checkpoints keep them.
    """
    import torch
    from transformers import AutoConfig

    from ..ir.tracing import trace

    info = inspect_model(path, hub=hub, task=task)
    kwargs = _label_kwargs(info, AutoConfig.from_pretrained(info.path), label_names, num_labels)
    torch.manual_seed(seed)  # draws the new head, if any
    with _quiet_transformers():  # a new head is by design: HF's "newly initialized" report is noise here
        model = _auto_class(info.task).from_pretrained(info.path, **kwargs)
    model.eval()
    names = [model.config.id2label[i] for i in sorted(model.config.id2label)] if info.task in _LABELLED_TASKS else []
    graph = trace(model)
    graph.source.update(tokenizer=str(info.path), task=info.task, label_names=names, pooling=info.pooling, normalize=info.normalize)
    head = "none" if info.task == "feature-extraction" else "kept" if info.has_head else f"new (seed {seed})"
    log(
        f"loaded {info.path}: {info.architecture or info.model_type} as {type(model).__name__}, task {info.task}, "
        f"labels {', '.join(names) or 'none'}, head {head}"
    )
    return graph


# -- locating and checking the folder --------------------------------------------------------
def _resolve(path, hub) -> Path:
    if (path is None) == (hub is None):
        raise ValueError("pass exactly one of path= (a save_pretrained folder) or hub= (a model id in the local HF cache)")
    if path is not None:
        return Path(path).expanduser().resolve()
    return _cached_snapshot(hub)


def _hub_cache() -> str:
    """The HF cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = _hub_cache()
    try:  # local_files_only: resolve refs/main to a snapshot folder, never touch the network
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True)).resolve()
    except ValueError as error:  # HFValidationError
        raise ValueError(f"hub={repo_id!r} is not a Hub model id (org/name): {error}") from None
    except FileNotFoundError:  # LocalEntryNotFoundError
        raise FileNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache ({cache}): graphprune never downloads; "
            f"download it once where there is a network (`hf download {repo_id}`), or pass path= to a saved folder"
        ) from None


def _check_files(folder: Path) -> None:
    expected = "a save_pretrained folder holds config.json, model.safetensors or pytorch_model.bin, and tokenizer files"
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist ({expected})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json ({expected})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files: expected one of {', '.join(TOKENIZER_FILES)} "
            "(save them with tokenizer.save_pretrained(folder))"
        )


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None


# -- task and head -------------------------------------------------------------------------------
def _folder_task(folder: Path, architecture: str) -> str | None:
    """The task of the head the folder's weights hold; None for a backbone (or no architectures)."""
    for suffix, task in _HEAD_TASKS.items():
        if architecture.endswith(suffix):
            return task
    if architecture and not architecture.endswith(_BACKBONE_SUFFIXES):
        # e.g. *ForMultipleChoice: its head has another shape, and dropping it silently would surprise
        raise ValueError(
            f"{folder}: architecture {architecture} has a head graphprune does not load; supported: "
            f"*{', *'.join(_HEAD_TASKS)}, or a backbone (*{', *'.join(_BACKBONE_SUFFIXES)}) that gets a new head"
        )
    return None


def _choose_task(folder: Path, task, architecture: str, folder_task, sentence_transformers: bool) -> str:
    if task is not None:
        if task not in PIPELINE_TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(PIPELINE_TASKS)}")
        if folder_task is not None and task != folder_task:
            raise ValueError(
                f"task {task!r} contradicts {folder}: its weights hold a {architecture} head ({folder_task!r}); "
                f"pass task={folder_task!r}, or a base model folder to get a new head"
            )
        return task
    if folder_task is not None:
        return folder_task
    if sentence_transformers:
        return "feature-extraction"  # a sentence-transformers encoder: embeddings are what it is for
    why = (
        "config.json lists no architectures" if not architecture
        else f"{architecture} is a base model without sentence-transformers files (modules.json)"
        if architecture.endswith("Model")
        else f"{architecture} holds a pretraining head, not a task head"
    )  # fmt: skip
    raise ValueError(f"cannot infer the task of {folder}: {why}; pass task= one of {', '.join(PIPELINE_TASKS)}")


def _auto_class(task: str):
    import transformers

    return {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "question-answering": transformers.AutoModelForQuestionAnswering,
        "feature-extraction": transformers.AutoModel,
    }[task]


def _label_kwargs(info: ModelInfo, config, label_names, num_labels) -> dict:
    """``from_pretrained`` keyword arguments that size a new head or rename a kept one's labels."""
    if info.task not in _LABELLED_TASKS:
        if label_names is not None or num_labels is not None:
            raise ValueError(f"task {info.task!r} has no class labels: leave label_names and num_labels out")
        return {}
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names must be distinct, got {label_names}")
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(f"num_labels={num_labels} but {len(label_names)} label_names were given")
    if info.has_head:
        size = config.num_labels
        given = len(label_names) if label_names is not None else num_labels
        if given is not None and given != size:
            raise ValueError(
                f"{info.path} has a {info.architecture} head with {size} labels ({', '.join(info.label_names)}); "
                f"got {given} (label_names/num_labels must match it)"
            )
        if label_names is None:
            return {}
    elif label_names is None:
        if num_labels is None:
            raise ValueError(
                f"{info.path} has no {info.task} head ({info.architecture or 'no architectures'}): a new one is made, "
                "so pass num_labels= or label_names= to size it"
            )
        label_names = [f"LABEL_{i}" for i in range(num_labels)]
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _placeholders(names) -> bool:
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one log line per load, not a weight-loading bar
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# -- sentence-transformers ---------------------------------------------------------------------------
def _st_modules(folder: Path) -> list | None:
    """modules.json's list of modules, or None for a folder that is not a sentence-transformers model."""
    file = folder / "modules.json"
    if not file.is_file():
        return None
    modules = _read_json(file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{file} is not a sentence-transformers module list (a list of {{idx, name, path, type}})")
    return modules


def _st_pooling(folder: Path, modules: list) -> tuple[str, bool]:
    """(pooling, normalize) from the Pooling module's config and the presence of a Normalize module."""
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        return "mean", normalize
    file = folder / kinds["Pooling"].get("path", "1_Pooling") / "config.json"
    if not file.is_file():
        return "mean", normalize  # sentence-transformers' own default
    config = _read_json(file)
    enabled = sorted(key for key, on in config.items() if key.startswith("pooling_mode_") and on is True)
    if len(enabled) != 1 or enabled[0] not in _POOLING_MODES:
        raise ValueError(
            f"{file}: pooling {', '.join(enabled) or '(none enabled)'} is not supported; "
            f"graphprune supports exactly one of {', '.join(_POOLING_MODES)}"
        )
    return _POOLING_MODES[enabled[0]], normalize
