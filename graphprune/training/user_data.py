"""Users' own data files for the four tasks, read with HF ``datasets`` and checked before any work.

Formats by extension: ``.csv``, ``.tsv``, ``.json`` (an array of objects or JSON Lines),
``.jsonl``, ``.parquet``, or a folder written by ``save_to_disk`` (a ``DatasetDict``
folder gives the split named like the argument). A missing validation or test split
is cut from train, seeded and keeping the ``group`` column's values apart. Bad data is
one error naming the file, the column and the first bad rows (1-based data rows).

In a job file the mapping from graphprune's column names to the file's reads::

    [data]
    task = "text-classification"
    train = "reviews/train.csv"
    test = "reviews/test.csv"
    group = "movie"
    label_names = ["negative", "positive"]
    columns = { text = "review", label = "sentiment" }

which is ``load_data("text-classification", train="reviews/train.csv", test="reviews/test.csv",
group="movie", label_names=["negative", "positive"], columns={"text": "review", "label": "sentiment"})``.

Label rules: string labels need names, from ``label_names`` (wins), else the model's
real ``id2label`` names, else (a model with no head) the data's own, sorted ("O" first
for tags); a model with only ``LABEL_n`` placeholders needs ``label_names``. Integers
are ids. Lists are multi-label. Floats are regression targets: a column that
``datasets`` reads as floats (``0, 1, 0.5``) is regression even where a value is whole,
while Python ints and floats side by side (a JSON column that also holds strings) are
mixed types and an error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .data import TextDataset, _split_by_group
from .task_data import EmbeddingDataset, QADataset, TokenDataset
from .user_data_checks import (Table, blank, check_answers, check_groups, check_query_pairs, check_texts, check_token_rows,
                               decode_json, decode_lists, resolve_labels)

SPLITS = ("train", "validation", "test")
# task -> (required canonical columns, optional ones); feature-extraction needs text or query+document
COLUMNS = {
    "text-classification": (("text", "label"), ("text_pair",)),
    "token-classification": (("tokens", "tags"), ()),
    "question-answering": (("question", "context", "answers"), ("id",)),
    "feature-extraction": ((), ("text", "query", "document")),
}
FORMATS = {".csv": "CSV", ".tsv": "TSV", ".json": "JSON", ".jsonl": "JSON Lines", ".parquet": "Parquet"}


@dataclass
class UserData:
    """The three splits, their label names and problem type, where each split came from, and texts splits share."""

    splits: dict[str, object]
    label_names: tuple[str, ...] = ()
    problem: str | None = None  # "single_label", "multi_label", "regression"; None beyond text classification
    files: dict[str, str] = field(default_factory=dict)
    overlaps: dict[str, int] = field(default_factory=dict)  # "train/test" -> distinct texts found in both


def load_data(task: str, *, train=None, validation=None, test=None, columns=None, validation_share=0.1, test_share=0.1,
              split_seed=0, group=None, strict=False, label_names=None, model_label_names=None, log=print) -> UserData:
    """Read, check and split the user's files for ``task`` (an HF pipeline name); see the module docstring."""
    if task not in COLUMNS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(COLUMNS)}")
    if train is None:
        raise ValueError("a train file is required (train=...)")
    for name, share in (("validation_share", validation_share), ("test_share", test_share)):
        if not 0 < share < 0.5:
            raise ValueError(f"{name} must be between 0 and 0.5 (exclusive), got {share}")
    mapping = _mapping(task, columns or {})
    paths = {s: Path(p) for s, p in (("train", train), ("validation", validation), ("test", test)) if p is not None}
    tables = {split: _table(path, split, task, mapping, group) for split, path in paths.items()}
    for split, table in tables.items():
        _check(task, table)
        log(f"{split}: {len(table)} rows from {table.file}")
    names, problem = (), None
    if task in ("text-classification", "token-classification"):  # labels need all splits at once: names span them
        names, problem = resolve_labels(tables, task == "token-classification", label_names, model_label_names, log)
    files = {split: str(path) for split, path in paths.items()}
    missing = [s for s in SPLITS if s not in tables]
    if missing:
        tables.update(_cut(tables.pop("train"), missing, validation_share, test_share, split_seed, group, log))
        files.update({s: f"cut from {paths['train']}" for s in missing})
    # a split is named after its own file (reviews_test/test), or train's where it was cut from train
    splits = {s: _build(task, tables[s], names, f"{Path(paths.get(s, paths['train'])).stem}/{s}") for s in SPLITS}
    overlaps = _overlaps(splits, strict, log)
    return UserData(splits, names, problem, files, overlaps)


# --- reading ---------------------------------------------------------------------------------------------------------

def _mapping(task: str, columns: dict) -> dict[str, str]:
    """Canonical name -> file column name, for every canonical column the task knows."""
    required, optional = COLUMNS[task]
    allowed = required + optional
    unknown = sorted(set(columns) - set(allowed))
    if unknown:
        raise ValueError(f"unknown column names {unknown} for {task}; allowed: {', '.join(allowed)} "
                         "(the group column is given by group=)")
    return {name: columns.get(name, name) for name in allowed}


@contextlib.contextmanager
def _offline_scratch():
    """Offline ``datasets`` with progress bars off, and a scratch cache folder that is removed afterwards."""
    saved_env = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # datasets reads it when first imported; later, its config is what counts
    import datasets

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, datasets.is_progress_bar_enabled(),
             datasets.logging.get_verbosity())
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parser's complaint comes back in our own error
    try:
        # the builders write Arrow files and locks under cache_dir even with keep_in_memory: keep them out of the user's cache
        with tempfile.TemporaryDirectory(prefix="graphprune-data-") as cache:
            yield datasets, cache
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved[:2]
        if saved[2]:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(saved[3])
        if saved_env is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved_env


def _read(path: Path, split: str):
    """The file as a ``datasets.Dataset``; a missing, unreadable or empty file is an error naming it."""
    if not path.exists():
        raise FileNotFoundError(f"the {split} file {path} does not exist")
    if not path.is_dir() and path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use {', '.join(FORMATS)} or a save_to_disk folder")
    if not path.is_dir() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: the {split} split needs at least one row")
    with _offline_scratch() as (datasets, cache):
        if path.is_dir():
            return _read_folder(datasets, path, split)
        suffix = path.suffix.lower()
        reader = {".csv": datasets.Dataset.from_csv, ".tsv": datasets.Dataset.from_csv,
                  ".parquet": datasets.Dataset.from_parquet}.get(suffix, datasets.Dataset.from_json)
        # CSV: only an empty cell is missing; "NA" or "null" may well be someone's text
        options = {"keep_default_na": False, "na_values": [""]} if suffix in (".csv", ".tsv") else {}
        if suffix == ".tsv":
            options["sep"] = "\t"
        try:
            return reader(str(path), keep_in_memory=True, cache_dir=cache, **options)
        except Exception as error:  # the builders raise many kinds; each becomes one message naming the file
            if "corresponds to no data" in str(error):  # a header and no rows, or "[]"
                raise ValueError(f"{path} has no data rows: the {split} split needs at least one row") from None
            raise ValueError(f"{path} could not be read as {FORMATS[suffix]}: {_cause(error)}") from error


def _read_folder(datasets, path: Path, split: str):
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as error:
        raise ValueError(f"{path} is a folder but not one written by save_to_disk: {_cause(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} is a DatasetDict without a {split!r} split; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _cause(error: BaseException) -> str:
    while error.__cause__ is not None:  # DatasetGenerationError wraps the parser's own error
        error = error.__cause__
    return f"{type(error).__name__}: {str(error)[:200]}"


def _table(path: Path, split: str, task: str, mapping: dict[str, str], group: str | None) -> Table:
    """The file's columns under canonical names; a required or named column the file lacks is an error."""
    dataset = _read(path, split)
    if dataset.num_rows == 0:
        raise ValueError(f"{path} has no data rows: the {split} split needs at least one row")
    present = set(dataset.column_names)
    wanted = dict(mapping, group=group) if group is not None else dict(mapping)
    required, optional = COLUMNS[task]
    needed = set(required) | {c for c in optional if mapping[c] != c} | ({"group"} if group is not None else set())
    lacking = sorted(wanted[c] for c in needed if wanted[c] not in present)
    if lacking:
        raise ValueError(f"{path} has no column {', '.join(map(repr, lacking))}; its columns are {', '.join(dataset.column_names)}")
    used = {c: f for c, f in wanted.items() if f in present}
    if task == "feature-extraction":
        if ("query" in used) != ("document" in used):
            lacks = "document" if "query" in used else "query"
            raise ValueError(f"{path} has no {lacks} column {wanted[lacks]!r} to pair with; its columns are {', '.join(dataset.column_names)}")
        if "text" not in used and "query" not in used:
            raise ValueError(f"{path} needs a text column or query and document columns ({wanted['text']!r}, "
                             f"{wanted['query']!r}, {wanted['document']!r}); its columns are {', '.join(dataset.column_names)}")
    values = dataset.select_columns(sorted(set(used.values()))).to_dict()
    return Table(str(path), {c: list(values[f]) for c, f in used.items()}, used, path.suffix.lower() in (".csv", ".tsv"))


# --- checks --------------------------------------------------------------------------------------------------------

def _check(task: str, table: Table) -> None:
    """Every check but the labels' (which need all splits at once), in the order the columns are read."""
    if "group" in table.columns:
        table.columns["group"] = check_groups(table)
    if task == "text-classification":
        for column in ("text", "text_pair"):
            if column in table.columns:
                check_texts(table, column)
    elif task == "token-classification":
        decode_lists(table, "tokens", numbers=False)
        decode_lists(table, "tags", numbers=True)
        check_token_rows(table)
    elif task == "question-answering":
        check_texts(table, "question")
        check_texts(table, "context")
        decode_json(table, "answers")
        check_answers(table)
    else:
        if "text" in table.columns:
            check_texts(table, "text")
        if "query" in table.columns:  # rows with a text may leave out the pair; without texts every row needs one
            check_query_pairs(table, required="text" not in table.columns)


# --- splits ----------------------------------------------------------------------------------------------------------

def _rows(table: Table, indices: list[int]) -> Table:
    return Table(table.file, {c: [v[i] for i in indices] for c, v in table.columns.items()}, table.names, table.tabular)


def _cut(train: Table, missing, validation_share, test_share, seed, group, log) -> dict[str, Table]:
    """Cut the missing splits from train, seeded; all rows of one group land in one split."""
    shares = {"validation": validation_share if "validation" in missing else 0.0, "test": test_share if "test" in missing else 0.0}
    groups = train.columns.get("group") or [str(i) for i in range(len(train))]  # without groups each row is its own
    # rounded: 1 - 0.2 - 0.2 is 0.6000000000000001, which would put a group starting at exactly 60% in train
    fractions = (round(1 - shares["validation"] - shares["test"], 9), shares["validation"], shares["test"])
    # the built-in seeded group-aware split, reused: each row's "text" and "label" are its index here
    parts = _split_by_group([(i, i, g) for i, g in enumerate(groups)], fractions, seed, "cut", ())
    tables = {}
    for split in ("train", *missing):
        if not parts[split].texts:
            raise ValueError(f"cutting {', '.join(missing)} from {train.file} left {split} empty: train has {len(train)} rows "
                             f"in {len(set(groups))} groups; give a {split} file or larger shares (validation_share, test_share)")
        tables[split] = _rows(train, parts[split].texts)
    by = f"keeping {train.names['group']!r} groups apart" if group is not None else "row by row"
    sizes = ", ".join(f"{s} {len(tables[s])} rows ({shares[s]:.0%})" for s in missing)
    log(f"cut from {train.file}, seed {seed}, {by}: {sizes}; train keeps {len(tables['train'])} rows")
    return tables


def _build(task: str, table: Table, names, name: str):
    c, groups = table.columns, table.columns.get("group", [])
    if task == "text-classification":
        return TextDataset(c["text"], c["label"], names, groups, name, c.get("text_pair"))
    if task == "token-classification":
        return TokenDataset(c["tokens"], c["tags"], names, groups, name)
    if task == "question-answering":  # an "id" column is accepted but QADataset has no field for it yet
        answers = [{"text": a["text"], "answer_start": a["answer_start"]} for a in c["answers"]]
        return QADataset(c["question"], c["context"], answers, groups, name)
    paired = [i for i in range(len(table)) if "query" in c and not blank(c["query"][i])]
    queries, documents = [c["query"][i] for i in paired], [c["document"][i] for i in paired]
    if "text" in c:
        return EmbeddingDataset(c["text"], queries, documents, groups, name)
    return EmbeddingDataset(queries + documents, queries, documents, groups + groups, name)  # groups follow texts


def _keys(dataset) -> set:
    """What counts as the same example in two splits."""
    if isinstance(dataset, TextDataset):
        return set(zip(dataset.texts, dataset.pairs or [None] * len(dataset)))
    if isinstance(dataset, TokenDataset):
        return {tuple(words) for words in dataset.words}
    if isinstance(dataset, QADataset):
        return set(zip(dataset.questions, dataset.contexts))
    return set(dataset.texts)


def _overlaps(splits: dict, strict: bool, log) -> dict[str, int]:
    keys = {s: _keys(d) for s, d in splits.items()}
    overlaps = {f"{a}/{b}": len(keys[a] & keys[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]}
    shared = ", ".join(f"{pair} {n}" for pair, n in overlaps.items() if n)
    if shared:
        message = f"splits share texts (distinct texts in both): {shared}"
        if strict:
            raise ValueError(f"{message}; with strict=True splits must not share texts: remove the duplicates")
        log(f"warning: {message}; scores on the shared texts flatter the model")
    return overlaps
