"""A job file's ``[model]`` and ``[data]``: the built-in names, a graphprune checkpoint, or the user's own folder and files.

    [model]
    path = "runs/my-bert"             # a save_pretrained folder; or hub = "org/name" (local HF cache only);
    task = "text-classification"      # or name = "baseline" | "minilm"; or checkpoint = "runs/pruned"
    label_names = ["neg", "pos"]      # only where the config's labels are HF's LABEL_0, LABEL_1, ...

    [data]
    train = "reviews.csv"             # or name = "rotten_tomatoes" | "bbc_news"
    test = "reviews_test.csv"         # missing splits are cut from train (validation_share, test_share,
    columns = { text = "review", label = "sentiment" }   # split_seed, keeping a group column's values apart)

Everything is checked before any work; a mistake names the file, the section and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..ir.graph import Graph, load
from ..ir.tracing import trace
from ..training.baseline import load_baseline
from ..training.data import DATASETS, load_dataset
from ..training.models import load_minilm, load_tokenizer, minilm_path
from ..training.tasks import TASK_NAMES, task_for
from ..training.user_data import load_data
from ..training.user_model import inspect_model, load_model
from .export.artefact import label_names

MODEL_NAMES = ("minilm", "baseline")
MODEL_SOURCES = ("name", "checkpoint", "path", "hub")
MODEL_FIELDS = set(MODEL_SOURCES) | {"task", "num_labels", "label_names", "seed"}
DATA_FILES = ("train", "validation", "test")
DATA_FIELDS = {"name", *DATA_FILES, "columns", "validation_share", "test_share", "split_seed", "group", "strict",
               "eval_split", "eval_limit", "max_length"}


def check_model(path: Path, model: dict) -> dict:
    """The [model] table checked: exactly one source, a known task, label names as strings."""
    sources = [k for k in MODEL_SOURCES if k in model]
    if len(sources) != 1:
        raise ValueError(f"{path}: [model] needs exactly one of name = {' | '.join(map(repr, MODEL_NAMES))}, checkpoint = 'dir', "
                         f"path = 'save_pretrained folder' or hub = 'org/name'; got {sources or 'none'}")
    if "name" in model and model["name"] not in MODEL_NAMES:
        raise ValueError(f"{path}: [model] name = {model['name']!r} is not allowed; expected one of {list(MODEL_NAMES)}")
    for key in ("checkpoint", "path", "hub"):
        if key in model and (not isinstance(model[key], str) or not model[key]):
            raise ValueError(f"{path}: [model] {key} = {model[key]!r} is not allowed; expected a non-empty string")
    if "task" in model and model["task"] not in TASK_NAMES:
        raise ValueError(f"{path}: [model] task = {model['task']!r} is not allowed; expected one of {list(TASK_NAMES)}")
    if "task" in model and sources[0] in ("name", "checkpoint"):
        raise ValueError(f"{path}: [model] task is for path = or hub = models; a {sources[0]} model already has its task")
    labels = model.get("num_labels", 2)
    if not isinstance(labels, int) or isinstance(labels, bool) or labels < 1:
        raise ValueError(f"{path}: [model] num_labels = {labels!r} is not allowed; expected an integer >= 1")
    names = model.get("label_names")
    if names is not None and (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"{path}: [model] label_names = {names!r} is not allowed; expected a list of label names (index = id)")
    return model


def check_data(path: Path, data: dict) -> dict:
    """The [data] table checked: a built-in name or a train file, and the fields' types."""
    if ("name" in data) == ("train" in data):
        raise ValueError(f"{path}: [data] needs exactly one of name = {' | '.join(map(repr, DATASETS))} or train = 'file'")
    if "name" in data:
        if data["name"] not in DATASETS:
            raise ValueError(f"{path}: [data] name = {data['name']!r} is not allowed; expected one of {list(DATASETS)}")
        extra = sorted(set(data) & (DATA_FIELDS - {"name", "eval_split", "eval_limit", "max_length", "test_limit"}))
        if extra:
            raise ValueError(f"{path}: [data] {extra[0]} is for your own files (train = ...); the built-in {data['name']!r} has its own")
    for key in DATA_FILES + ("group",):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise ValueError(f"{path}: [data] {key} = {data[key]!r} is not allowed; expected a file path" + (" (column name)" if key == "group" else ""))
    if "columns" in data and (not isinstance(data["columns"], dict) or not all(isinstance(v, str) for v in data["columns"].values())):
        raise ValueError(f"{path}: [data] columns must be a table of our name = 'your column', e.g. {{ text = 'review', label = 'sentiment' }}")
    if "strict" in data and not isinstance(data["strict"], bool):
        raise ValueError(f"{path}: [data] strict = {data['strict']!r} is not allowed; expected true or false")
    for key in ("validation_share", "test_share"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], (int, float)) or not 0 < data[key] < 0.5):
            raise ValueError(f"{path}: [data] {key} = {data[key]!r} is not allowed; expected a number in (0, 0.5)")
    if "split_seed" in data and (isinstance(data["split_seed"], bool) or not isinstance(data["split_seed"], int)):
        raise ValueError(f"{path}: [data] split_seed = {data['split_seed']!r} is not allowed; expected an integer")
    return data


@dataclass
class JobInputs:
    """The dense graph, its tokenizer, the splits and where each came from."""

    dense: Graph
    tokenizer: object
    splits: dict
    task: str


def _files_relative(path: Path, value: str) -> str:
    """A path in a job file is relative to the job file's folder (as the run file's own outputs are not)."""
    candidate = Path(value)
    return str(candidate if candidate.is_absolute() or not (path.parent / candidate).exists() else path.parent / candidate)


def _read_files(path: Path, data: dict, task: str, label_names, model_labels, log):
    """The user's files a [data] table names, read for ``task`` and checked against the model's labels."""
    files = {k: _files_relative(path, data[k]) for k in DATA_FILES if k in data}
    options = {k: data[k] for k in ("columns", "validation_share", "test_share", "split_seed", "group", "strict") if k in data}
    return load_data(task, **files, **options, label_names=label_names, model_label_names=model_labels, log=log)


def load_inputs(path, model: dict, data: dict, *, log=print) -> JobInputs:
    """Load the job's model and data; the data's labels are checked against the model's before any weights load."""
    path = Path(path)
    if "name" in data:
        return _builtin_data(path, model, data)
    if model.get("name") == "minilm":  # the shipped encoder with a new head sized from the user's labels
        model = {**{k: v for k, v in model.items() if k != "name"}, "path": str(minilm_path()), "task": "text-classification"}
    if "path" not in model and "hub" not in model:  # a checkpoint or the baseline: its task and labels are fixed
        dense, tokenizer = _builtin_model(model, 2)
        task = task_for(dense, f"{path}: [model]").name
        loaded = _read_files(path, data, task, model.get("label_names"), tuple(label_names(dense)) or None, log)
        return JobInputs(dense, tokenizer, loaded.splits, task)
    folder = _files_relative(path, model["path"]) if "path" in model else None
    info = inspect_model(folder, hub=model.get("hub"), task=model.get("task"))
    own_labels = info.label_names if info.has_head else None
    loaded = _read_files(path, data, info.task, model.get("label_names"), own_labels, log)
    sizing = {}
    named = info.has_head and not info.placeholder_labels and not model.get("label_names")
    if info.task in ("text-classification", "token-classification") and not named:
        # a new head, placeholder names, or the job's own names: the data's label names (index = id) size and name it
        sizing = {"label_names": list(loaded.label_names)} if loaded.label_names else {"num_labels": 1}  # no names: regression
    dense = load_model(folder, hub=model.get("hub"), task=info.task, seed=model.get("seed", 0), log=log, **sizing)
    return JobInputs(dense, load_tokenizer(dense.source["tokenizer"]), loaded.splits, info.task)


def _builtin_data(path: Path, model: dict, data: dict) -> JobInputs:
    splits = load_dataset(data["name"])
    if "path" in model or "hub" in model:
        folder = _files_relative(path, model["path"]) if "path" in model else None
        info = inspect_model(folder, hub=model.get("hub"), task=model.get("task"))
        if info.task != "text-classification":
            raise ValueError(f"{path}: [data] name = {data['name']!r} is text-classification data; the model is {info.task}")
        names = list(splits["train"].label_names)
        sizing = {} if info.has_head and not info.placeholder_labels else {"label_names": names}
        dense = load_model(folder, hub=model.get("hub"), task=info.task, seed=model.get("seed", 0), **sizing)
        return JobInputs(dense, load_tokenizer(dense.source["tokenizer"]), splits, info.task)
    dense, tokenizer = _builtin_model(model, model.get("num_labels", len(splits["train"].label_names)))
    return JobInputs(dense, tokenizer, splits, task_for(dense, f"{path}: [model]").name)


def _builtin_model(model: dict, num_labels: int):
    """A checkpoint, the cached baseline, or MiniLM with a new head of ``num_labels``."""
    if "checkpoint" in model:
        graph = load(model["checkpoint"])
        return graph, load_tokenizer(graph.source.get("tokenizer", "minilm"))
    if model["name"] == "baseline":
        return load_baseline(), load_tokenizer("minilm")
    hf_model, tokenizer = load_minilm(num_labels=num_labels)
    graph = trace(hf_model)
    graph.source["tokenizer"] = "minilm"
    return graph, tokenizer


def check_data_argument(value: str) -> None:
    """Refuse a ``--data`` that is neither a built-in data set nor a job file, before anything loads."""
    if value not in DATASETS and not (value.endswith(".toml") and Path(value).is_file()):
        raise ValueError(f"--data {value!r} is neither a built-in data set ({', '.join(DATASETS)}) nor a job file (.toml) with a [data] table")


def data_argument(value: str, task: str, model_labels=None, *, log=print) -> dict:
    """The splits a command line's ``--data`` names: a built-in data set, or a job file whose [data] names files.

    ``task`` and ``model_labels`` (the model's label names, index = id) are the model's,
    so the files' labels are checked against them, as ``graphprune run`` checks them.
    """
    if value in DATASETS:
        if task != "text-classification":
            raise ValueError(f"--data {value} is text-classification data; the model is {task}")
        return load_dataset(value)
    check_data_argument(value)
    path = Path(value)
    from ..infra.pipeline import read_toml

    spec = read_toml(path)
    data = check_data(path, spec.get("data") or {})
    if "name" in data:
        return data_argument(data["name"], task, model_labels, log=log)
    return _read_files(path, data, task, (spec.get("model") or {}).get("label_names"), model_labels, log).splits
