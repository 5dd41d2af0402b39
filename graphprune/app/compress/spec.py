"""What ``graphprune compress`` is asked: from the command line, or from a job file's ``[compress]`` section.

    graphprune compress runs/my-bert --task text-classification --data job.toml --max-drop 1 --time 30m --out compressed

or, the same as a job file (``graphprune compress job.toml``)::

    [model]
    path = "runs/my-bert"
    [data]
    train = "reviews.csv"
    [compress]
    max_drop = 1          # points of the main metric on validation; "1%" is relative to dense
    time = "30m"          # the whole run, start to exit
    shapes = ["8x128", "1x64"]
    runtimes = ["onnx", "aoti", "torch"]
    out = "compressed"

A job file may narrow the default space with a search job's own ``[[passes]]``, ``[finetune]``
or ``[export]`` (each replaces the default one whole) and set ``[search]`` ``seed``,
``sampler``, ``enqueue`` or ``study``. Every path is made absolute here (a job file's relative to
its folder, a command line's to the working directory), so the search job written into the
output folder runs from anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...infra.pipeline import read_toml
from ...training.data import DATASETS
from ..job_inputs import DATA_FILES, MODEL_NAMES, check_data, check_model
from ..search.budget import parse_duration
from .space import RUNTIMES

FIELDS = {"max_drop", "time", "trials", "shapes", "runtimes", "out", "storage", "workers", "seed"}
SECTIONS = {"model", "data", "compress", "passes", "finetune", "export", "search"}
SEARCH_FIELDS = {"seed", "sampler", "enqueue", "study"}
DEFAULT_SHAPES = ((8, 128), (1, 64))


@dataclass(frozen=True)
class CompressSpec:
    model: dict                 # a [model] table, paths absolute
    data: dict                  # a [data] table, paths absolute
    max_drop: float             # points, or percent of dense when relative
    relative: bool
    seconds: float
    trials: int | None = None
    shapes: tuple = DEFAULT_SHAPES
    runtimes: tuple = RUNTIMES
    out: Path = Path("compressed")
    storage: str | None = None
    workers: int = 1
    seed: int = 0
    narrowing: dict = field(default_factory=dict)  # passes / finetune / export from a job file
    source: Path | None = None                     # that job file
    search: dict = field(default_factory=dict)     # seed, sampler, enqueue, study


def parse_max_drop(value, where="compress: --max-drop") -> tuple[float, bool]:
    """``1`` (points) or ``"1%"`` (relative to the dense model's validation metric)."""
    text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    match = re.fullmatch(r"(\d+(\.\d+)?)\s*(%?)", text)
    if not match:
        raise ValueError(f"{where} = {value!r} is not allowed; expected points of the main metric such as 1 or 0.5, or a share of it such as 1%")
    return float(match.group(1)), bool(match.group(3))


def parse_shapes(value, where="compress: --shapes") -> tuple:
    items = value.split(",") if isinstance(value, str) else value
    shapes = []
    for item in items if isinstance(items, (list, tuple)) else [None]:
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item) if isinstance(item, str) else None
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
            raise ValueError(f"{where} = {value!r} is not allowed; expected batch x length pairs such as 8x128,1x64")
        shapes.append((int(match.group(1)), int(match.group(2))))
    if not shapes or len(set(shapes)) != len(shapes):
        raise ValueError(f"{where} = {value!r} is not allowed; expected distinct batch x length pairs such as 8x128,1x64")
    return tuple(shapes)


def parse_runtimes(value, where="compress: --runtimes") -> tuple:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or any(r not in RUNTIMES for r in items) or len(set(items)) != len(items):
        raise ValueError(f"{where} = {value!r} is not allowed; expected a selection of {', '.join(RUNTIMES)}")
    return tuple(r for r in RUNTIMES if r in items)


def _absolute(base: Path, value: str) -> str:
    candidate = Path(value).expanduser()
    return str((candidate if candidate.is_absolute() else base / candidate).resolve())


def model_argument(value: str, task: str | None = None) -> dict:
    """A command line's MODEL: a built-in name, a graphprune checkpoint folder or a save_pretrained folder."""
    if value in MODEL_NAMES:
        model = {"name": value}
    elif (Path(value) / "graph.json").is_file():
        model = {"checkpoint": _absolute(Path.cwd(), value)}
    elif (Path(value) / "config.json").is_file():
        model = {"path": _absolute(Path.cwd(), value)}
    else:
        raise ValueError(f"compress: MODEL {value!r} is neither a built-in model ({', '.join(MODEL_NAMES)}), a graphprune checkpoint "
                         "folder (graph.json) nor a save_pretrained folder (config.json), nor a job file (.toml)")
    if task is not None:
        model["task"] = task
    return check_model(Path("compress"), model)


def data_argument(value: str | None) -> dict:
    """A command line's ``--data``: a built-in data set, or a job file whose [data] names files."""
    if value is None or value in DATASETS:
        return {"name": value or "rotten_tomatoes"}
    path = Path(value)
    if not (value.endswith(".toml") and path.is_file()):
        raise ValueError(f"compress: --data {value!r} is neither a built-in data set ({', '.join(DATASETS)}) nor a job file (.toml) with a [data] table")
    return _data_table(path, read_toml(path).get("data") or {})


def _data_table(path: Path, data: dict) -> dict:
    data = dict(check_data(path, dict(data)))
    for key in DATA_FILES:
        if key in data:
            data[key] = _absolute(path.parent, data[key])
    return data


def _model_table(path: Path, model: dict) -> dict:
    model = dict(check_model(path, dict(model)))
    for key in ("checkpoint", "path"):
        if key in model:
            model[key] = _absolute(path.parent, model[key])
    return model


def _integer(where: str, value, low: int):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ValueError(f"{where} = {value!r} is not allowed; expected an integer >= {low}")
    return value


def make_spec(model: dict, data: dict, *, max_drop=1.0, time="30m", trials=None, shapes=DEFAULT_SHAPES, runtimes=RUNTIMES,
              out="compressed", storage=None, workers=1, seed=0, narrowing=None, search=None, where="compress", source=None) -> CompressSpec:
    """Check every option, naming it; nothing is loaded or written here."""
    drop, relative = parse_max_drop(max_drop, f"{where}: max_drop")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise ValueError(f"{where}: storage = {storage!r} is not allowed; expected a database URL such as postgresql://user@host/db")
    return CompressSpec(
        model=model, data=data, max_drop=drop, relative=relative, seconds=parse_duration(time, f"{where}: time"),
        trials=_integer(f"{where}: trials", trials, 1), shapes=shapes if isinstance(shapes, tuple) and all(isinstance(s, tuple) for s in shapes)
        else parse_shapes(shapes, f"{where}: shapes"), runtimes=parse_runtimes(runtimes, f"{where}: runtimes"),
        out=Path(out).expanduser().resolve(), storage=storage, workers=_integer(f"{where}: workers", workers, 1),
        seed=_integer(f"{where}: seed", seed, 0), narrowing=dict(narrowing or {}), search=dict(search or {}), source=source)


def read_compress_job(path, **overrides) -> CompressSpec:
    """A job file with ``[model]``, ``[data]`` and ``[compress]`` (command-line options in ``overrides`` win)."""
    path = Path(path)
    spec = read_toml(path)
    unknown = sorted(set(spec) - SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section [{unknown[0]}]; a compress job has {sorted(SECTIONS)}")
    section = spec.get("compress", {})
    bad = sorted(set(section) - FIELDS) if isinstance(section, dict) else ["(not a table)"]
    if bad:
        raise ValueError(f"{path}: [compress] has unknown field {bad[0]!r}; allowed: {sorted(FIELDS)}")
    search = spec.get("search", {})
    bad = sorted(set(search) - SEARCH_FIELDS)
    if bad:
        raise ValueError(f"{path}: [search] {bad[0]} is set by compress itself; a compress job may set {sorted(SEARCH_FIELDS)} there")
    options = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    if "out" in section and "out" not in overrides:
        options["out"] = _absolute(path.parent, section["out"])
    elif "out" not in options:
        options["out"] = _absolute(path.parent, f"{path.stem}_compressed")
    narrowing = {k: spec[k] for k in ("passes", "finetune", "export") if k in spec}
    return make_spec(_model_table(path, spec.get("model", {"name": "baseline"})), _data_table(path, spec.get("data", {"name": "rotten_tomatoes"})),
                     narrowing=narrowing, search=search, where=str(path), source=path, **options)
