"""A search job file: the run-file sections plus ``[search]``, with search values in place of pass fields.

    [model]                      # as in a run file
    name = "baseline"

    [data]
    name = "rotten_tomatoes"
    eval_limit = 500             # trials score this seeded subset of the validation split
    max_length = 64

    [search]
    trials = 30
    sampler = "tpe"              # tpe | nsga2 | random
    seed = 0                     # a fixed seed makes the search repeatable
    objectives = ["accuracy", "latency"]
    orders = [["prune", "quant"], ["quant", "prune"]]   # optional: the pass order as a choice, by id
    constraints = { accuracy_drop = 1.0 }               # points of validation accuracy at most
    enqueue = [{ "structured_search.flops" = 0.3 }]     # optional: trials run first (a known pipeline,
                                 # a prior); the values they leave out are sampled
    latency = { batch_size = 8, max_length = 128 }   # real examples up to max_length tokens;
                                 # padded = true: exactly batch_size x max_length, as graphprune compress times

    [[passes]]
    name = "structured_search"
    optional = true              # the search may leave the pass out
    flops = { range = [0.3, 0.9], step = 0.05 }

    [[passes]]
    id = "quant"                 # default: the pass name
    name = "quantize"
    linear.config.weight_width = { choice = [4, 8] }

    [finetune]                   # optional distilled recovery; max_steps = 0 skips it
    distill = true
    max_steps = { choice = [0, 50, 100] }
    after = ["structured_search"]   # optional: only when the trial runs one of these passes (ids): a
                                 # recovery with nothing removed would only cost time

    [export]                     # optional: trials measured as an artefact in its own runtime
    optional = true              # the search may keep the graph in torch instead
    format = "onnx"              # onnx | aoti | hf, as a run file's [[export]]
    quantize = { choice = ["dynamic", "static"] }   # onnx only (other formats ignore it); ONNX Runtime
                                 # quantizes the float graph, so a trial that exports to ONNX leaves out `lower`

A search value is a table with one of ``choice = [...]``, ``range = [lo, hi]`` (with an
optional ``step``), ``int = [lo, hi]`` (optional ``step``) or ``log = [lo, hi]``; it may
stand for any pass field, nested fields included. Everything is checked before any
trial runs: each pass config is built at every choice and at both ends of every range.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

from ...infra.pipeline import read_toml, resolve_steps
from ..run_file import FIELDS as RUN_FIELDS
from ..job_inputs import check_data, check_model
from ..run_file import EXPORT_FIELDS, _check_export, _check_section, check_finetune
from .objectives import CONSTRAINTS, METRICS

SECTIONS = {"model", "data", "search", "passes", "finetune", "export"}
SEARCH_FIELDS = {"trials", "sampler", "seed", "objectives", "orders", "constraints", "latency", "study", "storage", "output", "cache_size",
                 "enqueue"}
SAMPLERS = ("tpe", "nsga2", "random")
KINDS = ({"choice"}, {"range"}, {"range", "step"}, {"int"}, {"int", "step"}, {"log"})
LATENCY_FIELDS = {"batch_size": 8, "max_length": 128, "iters": 10}


@dataclass(frozen=True)
class Param:
    """One searched value: where it goes (pass id and field path, or ``finetune``) and its distribution."""

    name: str            # the Optuna parameter name, e.g. "structured_search.flops"
    kind: str            # choice | range | int | log
    values: tuple         # the choices, or (lo, hi)
    step: float | None = None

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        lo, hi = self.values
        if self.kind == "int":
            return trial.suggest_int(self.name, lo, hi, step=int(self.step or 1))
        return trial.suggest_float(self.name, lo, hi, step=self.step, log=self.kind == "log")

    def extremes(self) -> list:
        return list(self.values)

    def allows(self, value) -> bool:
        """Whether ``value`` is one this parameter can take (an enqueued trial's value)."""
        if self.kind == "choice":
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)  # True is not 1
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        lo, hi = self.values
        if not lo <= value <= hi:
            return False
        if self.step is None:
            return True
        steps = (value - lo) / self.step
        return abs(steps - round(steps)) < 1e-9


def _is_search_value(value) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) & {"choice", "range", "int", "log"} != set()


def _param(where: str, name: str, value: dict) -> Param:
    if set(value) not in KINDS:
        raise ValueError(f"{where}: a search value has exactly one of choice, range, int or log (range and int may add step); got {sorted(value)}")
    kind = next(k for k in ("choice", "range", "int", "log") if k in value)
    values = value[kind]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: choice = {values!r} is not allowed; expected a non-empty list")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"{where}: choice = {values!r} repeats a value")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"{where}: choice = {values!r}: choices are numbers, strings or booleans")
        return Param(name, kind, tuple(values))
    numeric = (int,) if kind == "int" else (int, float)
    if (not isinstance(values, list) or len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numeric) for v in values)
            or not all(map(math.isfinite, values)) or not values[0] < values[1] or (kind == "log" and values[0] <= 0)):
        what = "two integers lo < hi" if kind == "int" else "two positive numbers lo < hi" if kind == "log" else "two numbers lo < hi"
        raise ValueError(f"{where}: {kind} = {values!r} is not allowed; expected [lo, hi], {what}")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, numeric) or not 0 < step <= values[1] - values[0]):
        raise ValueError(f"{where}: step = {step!r} is not allowed; expected a number in (0, hi - lo]")
    return Param(name, kind, tuple(values), step)


def _collect(where: str, prefix: str, config: dict, out: list[Param], path=()) -> None:
    for key, value in config.items():
        if _is_search_value(value):
            out.append(_param(f"{where} field {'.'.join(path + (key,))!r}", f"{prefix}.{'.'.join(path + (key,))}", value))
        elif isinstance(value, dict):
            _collect(where, prefix, value, out, path + (key,))


def fill(config: dict, values: dict, prefix: str) -> dict:
    """``config`` with every search value replaced by ``values[param name]``."""
    def walk(node: dict, path: tuple) -> dict:
        out = {}
        for key, value in node.items():
            name = f"{prefix}.{'.'.join(path + (key,))}"
            out[key] = values[name] if _is_search_value(value) else walk(value, path + (key,)) if isinstance(value, dict) else copy.deepcopy(value)
        return out

    return walk(config, ())


@dataclass(frozen=True)
class SearchJob:
    path: Path
    model: dict
    data: dict
    passes: tuple          # (id, pass name, config with search values, optional)
    finetune: dict | None  # with search values
    distill: bool
    export: dict | None    # with search values; "optional" among them
    params: tuple          # every Param, passes first
    orders: tuple          # tuples of pass ids; one order when not searched
    trials: int
    sampler: str
    seed: int | None
    objectives: tuple
    constraints: dict
    latency: dict
    study: str
    storage: str | None
    output: Path
    cache_size: int
    enqueue: tuple = ()    # dicts of parameter values: trials run first
    finetune_after: tuple = ()  # pass ids: the fine-tune runs only in a trial that runs one of them


def _integer(path, where: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{path}: {where} = {value!r} is not allowed; expected an integer >= {low}")
    return value


def read_search_job(path) -> SearchJob:
    """Parse and check a search job; raises ValueError naming the file, the section and the field."""
    path = Path(path)
    spec = read_toml(path)
    unknown = sorted(set(spec) - SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section [{unknown[0]}]; allowed: {sorted(SECTIONS)}")
    model = check_model(path, _check_section(path, "model", spec.get("model", {"name": "baseline"}), RUN_FIELDS["model"]))
    data = _check_section(path, "data", spec.get("data", {"name": "rotten_tomatoes"}), RUN_FIELDS["data"] - {"eval_split"} | {"test_limit"})
    check_data(path, {k: v for k, v in data.items() if k != "test_limit"})
    for field in ("eval_limit", "test_limit", "max_length"):
        if field in data:
            _integer(path, f"[data] {field}", data[field], 2)
    search = _check_section(path, "search", spec.get("search", {}), SEARCH_FIELDS)
    params: list[Param] = []
    passes = spec.get("passes", [])
    if not isinstance(passes, list) or not passes or not all(isinstance(p, dict) for p in passes):
        raise ValueError(f"{path}: a search needs an array of [[passes]] tables, each with a name")
    entries = []
    for index, table in enumerate(passes, start=1):
        table = dict(table)
        name, ident, optional = table.pop("name", None), table.pop("id", None), table.pop("optional", False)
        ident = ident or name
        where = f"{path}: [[passes]] {index} ({name})"
        if not isinstance(ident, str) or any(ident == e[0] for e in entries):
            raise ValueError(f"{where}: id = {ident!r} is not allowed; each pass needs a distinct id (default its name)")
        if not isinstance(optional, bool):
            raise ValueError(f"{where}: optional = {optional!r} is not allowed; expected true or false")
        found: list[Param] = []
        _collect(where, ident, table, found)
        if optional:
            found.append(Param(f"{ident}.use", "choice", (True, False)))
        _check_configs(where, name, table, ident, found)
        params += found
        entries.append((ident, name, table, optional))
    finetune, distill, after = _read_finetune(path, spec, params, [e[0] for e in entries])
    export = _read_export(path, spec, params)
    orders = _read_orders(path, search.get("orders"), [e[0] for e in entries])
    if len(orders) > 1:
        params.append(Param("order", "choice", tuple(range(len(orders)))))
    objectives = search.get("objectives", ["accuracy", "latency"])
    if not isinstance(objectives, list) or not objectives or len(set(map(str, objectives))) != len(objectives) or not set(objectives) <= set(METRICS):
        raise ValueError(f"{path}: [search] objectives = {objectives!r} is not allowed; expected a non-empty list of distinct names from {sorted(METRICS)}")
    constraints = _check_section(path, "search.constraints", search.get("constraints", {}), CONSTRAINTS)
    for key, bound in constraints.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound < 0:
            raise ValueError(f"{path}: [search.constraints] {key} = {bound!r} is not allowed; expected a number >= 0 ({CONSTRAINTS[key]})")
    latency = {**LATENCY_FIELDS, **_check_section(path, "search.latency", search.get("latency", {}), set(LATENCY_FIELDS) | {"padded"})}
    padded = latency.pop("padded", False)
    if not isinstance(padded, bool):
        raise ValueError(f"{path}: [search.latency] padded = {padded!r} is not allowed; expected true or false")
    for key, value in latency.items():
        _integer(path, f"[search.latency] {key}", value, 1)
    latency["padded"] = padded
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ValueError(f"{path}: [search] sampler = {sampler!r} is not allowed; expected one of {list(SAMPLERS)}")
    seed = search.get("seed")
    if seed is not None:
        _integer(path, "[search] seed", seed, 0)
    for field in ("study", "storage", "output"):
        if field in search and (not isinstance(search[field], str) or not search[field]):
            raise ValueError(f"{path}: [search] {field} = {search[field]!r} is not allowed; expected a non-empty string")
    output = Path(search.get("output", f"{path.stem}_search"))
    return SearchJob(
        path=path, model=model, data=data, passes=tuple(entries), finetune=finetune, distill=distill, export=export, params=tuple(params),
        orders=tuple(orders), trials=_integer(path, "[search] trials", search.get("trials", 20), 1), sampler=sampler, seed=seed,
        objectives=tuple(objectives), constraints=dict(constraints), latency=latency, study=search.get("study", path.stem),
        storage=search.get("storage"), output=output if output.is_absolute() else path.parent / output,
        cache_size=_integer(path, "[search] cache_size", search.get("cache_size", 4), 0),
        enqueue=_read_enqueue(path, search.get("enqueue", []), params), finetune_after=after,
    )


def _variants(found: list[Param]) -> list[dict]:
    """Every choice and each end of every range, the other values at their first: what the checks build."""
    first = {p.name: p.values[0] for p in found}
    return [first] + [{**first, p.name: v} for p in found for v in p.extremes()[1:]]


def _check_configs(where: str, name, table: dict, ident: str, found: list[Param]) -> None:
    """Build the pass config at each choice and each end of each range (the others at their first value)."""
    for values in _variants(found):
        try:
            resolve_steps([(name, fill(table, values, ident))])
        except ValueError as error:
            raise ValueError(f"{where}: {str(error).removeprefix('pipeline step 1: ')}") from None


def _read_finetune(path, spec: dict, params: list[Param], idents: list[str]):
    if "finetune" not in spec:
        return None, False, ()
    table = dict(spec["finetune"])
    distill = table.pop("distill", False)
    after = table.pop("after", [])
    if not isinstance(after, list) or not after and "after" in spec["finetune"] or not set(after) <= set(idents):
        raise ValueError(f"{path}: [finetune] after = {after!r} is not allowed; expected a non-empty list of the job's pass ids {idents}")
    found: list[Param] = []
    _collect(f"{path}: [finetune]", "finetune", table, found)
    for values in _variants(found):
        concrete = fill(table, values, "finetune")
        if concrete.get("max_steps") == 0:
            concrete.pop("max_steps")  # no fine-tune at all; the other fields are still checked
        check_finetune(path, {**concrete, "distill": distill})
    params += found
    return table, distill, tuple(after)


def _read_export(path, spec: dict, params: list[Param]) -> dict | None:
    if "export" not in spec:
        return None
    if not isinstance(spec["export"], dict):
        raise ValueError(f"{path}: [export] is one table in a search job (the trial's artefact), not an array")
    table = dict(spec["export"])
    optional = table.pop("optional", False)
    if not isinstance(optional, bool):
        raise ValueError(f"{path}: [export] optional = {optional!r} is not allowed; expected true or false")
    bad = sorted(set(table) - (EXPORT_FIELDS - {"path"}))
    if bad:
        raise ValueError(f"{path}: [export] has unknown field {bad[0]!r}; allowed: {sorted(EXPORT_FIELDS - {'path'} | {'optional'})} "
                         "(each trial's artefact goes to a folder of the search's own)")
    found: list[Param] = []
    _collect(f"{path}: [export]", "export", table, found)
    searched_format = _is_search_value(table.get("format"))
    for values in _variants(found):  # quantize is dropped only for the other formats of a searched format
        concrete = fill(table, values, "export")
        _check_export(path, {**(_onnx_only(concrete) if searched_format else concrete), "path": "artefact"})
    if optional:
        found.append(Param("export.use", "choice", (True, False)))
    params += found
    return {**table, "optional": optional}


def _onnx_only(export: dict) -> dict:
    """``quantize`` is ONNX Runtime's: a searched format other than onnx leaves it out (AOTInductor packages the
    ``lower``-ed graph, already int8 where the pipeline lowers it)."""
    return export if export.get("format") == "onnx" else {k: v for k, v in export.items() if k != "quantize"}


def _read_enqueue(path, entries, params: list[Param]) -> tuple:
    """``[search] enqueue``: each entry a table of parameter names and values the trial takes."""
    by_name = {p.name: p for p in params}
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise ValueError(f"{path}: [search] enqueue = {entries!r} is not allowed; expected a list of non-empty tables of parameter values")
    flat = [_dotted(e) for e in entries]  # { structured_search.flops = 0.3 } is a nested table in TOML
    for index, entry in enumerate(flat, start=1):
        for name, value in entry.items():
            if name not in by_name:
                raise ValueError(f"{path}: [search] enqueue {index}: unknown parameter {name!r}; the job's parameters are {sorted(by_name)}")
            param = by_name[name]
            if not param.allows(value):
                allowed = f"one of {list(param.values)}" if param.kind == "choice" else \
                    f"{'an integer' if param.kind == 'int' else 'a number'} in [{param.values[0]}, {param.values[1]}]" + (f" on steps of {param.step}" if param.step else "")
                raise ValueError(f"{path}: [search] enqueue {index}: {name} = {value!r} is not allowed; expected {allowed}")
    return tuple(flat)


def _dotted(entry: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in entry.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _read_orders(path, orders, ids: list[str]) -> list[tuple]:
    if orders is None:
        return [tuple(ids)]
    if not isinstance(orders, list) or not orders:
        raise ValueError(f"{path}: [search] orders = {orders!r} is not allowed; expected a non-empty list of orders, each a list of pass ids")
    for order in orders:
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(ids):
            raise ValueError(f"{path}: [search] orders: {order!r} is not an order of the pass ids {ids}")
    return [tuple(o) for o in orders]


def sample(job: SearchJob, trial) -> tuple[list[tuple[str, dict]], dict | None, dict | None]:
    """The trial's concrete pipeline, ``[(pass name, config)]`` in its order, its fine-tune options and
    its export (each None when the trial has none)."""
    values = {p.name: p.suggest(trial) for p in job.params}
    order = job.orders[values.get("order", 0)]
    by_id = {ident: (name, table, optional) for ident, name, table, optional in job.passes}
    steps, used = [], set()
    for ident in order:
        name, table, optional = by_id[ident]
        if optional and not values[f"{ident}.use"]:
            continue
        steps.append((name, fill(table, values, ident)))
        used.add(ident)
    finetune = fill(job.finetune, values, "finetune") if job.finetune is not None else None
    if finetune is not None and (finetune.get("max_steps") == 0 or job.finetune_after and not used & set(job.finetune_after)):
        finetune = None
    export = None
    if job.export is not None and values.get("export.use", True):
        export = _onnx_only(fill({k: v for k, v in job.export.items() if k != "optional"}, values, "export"))
        if export["format"] == "onnx":
            steps = [(name, config) for name, config in steps if name != "lower"]  # ONNX Runtime quantizes the float graph
    return steps, finetune, export
