"""Checks on users' data columns for :mod:`graphprune.training.user_data`: every bad cell is found before any work.

Each check raises one ``ValueError`` that names the file, the column as the file
spells it, the first bad data rows (1-based, at most five, with their values) and
how many there are, and what is allowed. Nothing here reads files; it works on the
plain Python columns the reader hands over.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from typing import NoReturn

SHOWN = 5  # bad rows quoted in an error; the rest are counted


@dataclass
class Table:
    """One split as read from one file: canonical column name -> one value per data row."""

    file: str
    columns: dict[str, list]
    names: dict[str, str]  # canonical name -> the column's name in the file, for messages
    tabular: bool  # CSV/TSV: lists and dicts arrive as strings

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def fail(table: Table, column: str, rows: list[int], problem: str, allowed: str, values=None) -> NoReturn:
    """Raise the one error for ``rows`` (0-based) of ``column``, quoting each shown row's value."""
    values = table.columns[column] if values is None else values
    shown = ", ".join(f"{r + 1} ({_short(values[r])})" for r in rows[:SHOWN])
    more = f", and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
    raise ValueError(f"{table.file}, column {table.names[column]!r}: {problem} in {len(rows)} row(s): "
                     f"data rows {shown}{more}. {allowed}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def blank(value) -> bool:
    """None, NaN, or a string of only whitespace: a cell with nothing in it."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def check_texts(table: Table, column: str, optional_rows: set[int] = frozenset()) -> None:
    """Every row (bar ``optional_rows``) holds non-blank text; a number is not text."""
    bad = [i for i, v in enumerate(table.columns[column])
           if i not in optional_rows and (not isinstance(v, str) or not v.strip())]
    if bad:
        fail(table, column, bad, "blank or non-text values", "Each row needs a non-empty string.")


def check_groups(table: Table) -> list[str]:
    """Group values as strings; a row without one cannot be kept apart from the others."""
    values = table.columns["group"]
    bad = [i for i, v in enumerate(values) if blank(v)]
    if bad:
        fail(table, "group", bad, "blank group values", "Each row needs a group value (any string or number).")
    return [str(v) for v in values]


def _number(text: str):
    """A string in a CSV cell that is a JSON number or list, decoded; otherwise the string itself."""
    stripped = text.strip()
    if stripped[:1] in "[-0123456789":
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


def decode_labels(table: Table, column: str, known: tuple[str, ...]) -> None:
    """CSV/TSV label cells are strings: read JSON lists (multi-label) and numbers, unless the string is a known label name."""
    if table.tabular:
        table.columns[column] = [_number(v) if isinstance(v, str) and v not in known else v for v in table.columns[column]]


def decode_lists(table: Table, column: str, numbers: bool) -> None:
    """CSV/TSV cells holding lists: a JSON list (``["New", "York"]``) or items separated by spaces (``New York``).

    With ``numbers`` (tags), space-separated items that are numbers become ints; words stay strings.
    """
    if not table.tabular:
        return
    def decode(value):
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            with contextlib.suppress(ValueError):  # not JSON after all: a sentence may start with "["
                return json.loads(value)
        return [_number(item) if numbers else item for item in value.split()]

    table.columns[column] = [decode(v) for v in table.columns[column]]


def decode_json(table: Table, column: str) -> None:
    """CSV/TSV cells holding a JSON object (SQuAD's answers), decoded where they parse."""
    if table.tabular:
        table.columns[column] = [_try_json(v) if isinstance(v, str) else v for v in table.columns[column]]


def _try_json(text: str):
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return text  # left as it is: the shape check reports it


def check_token_rows(table: Table) -> None:
    """Words are non-empty lists of non-blank strings, with exactly one tag per word."""
    words, tags = table.columns["tokens"], table.columns["tags"]
    bad = [i for i, w in enumerate(words) if not isinstance(w, list) or not w or not all(isinstance(x, str) and x.strip() for x in w)]
    if bad:
        fail(table, "tokens", bad, "rows that are not lists of words",
             "Each row needs a non-empty list of non-blank words (in CSV: a JSON list or words separated by spaces).")
    bad = [i for i, t in enumerate(tags) if not isinstance(t, list)]
    if bad:
        fail(table, "tags", bad, "rows that are not lists of tags", "Each row needs a list of tags (in CSV: a JSON list or tags separated by spaces).")
    bad = [i for i, (w, t) in enumerate(zip(words, tags)) if len(w) != len(t)]
    if bad:
        fail(table, "tags", bad, "tag lists whose length differs from the words'", "Give exactly one tag per word.")


def check_answers(table: Table) -> None:
    """SQuAD answers: ``{"text": [...], "answer_start": [...]}``, each answer found in the context where it is said to start."""
    answers, contexts = table.columns["answers"], table.columns["context"]
    shape = "Each row needs {\"text\": [...], \"answer_start\": [...]} with as many starts as texts (at least one)."
    bad = [i for i, a in enumerate(answers) if not _answer_shaped(a)]
    if bad:
        fail(table, "answers", bad, "malformed answers", shape)
    outside = [i for i, (a, c) in enumerate(zip(answers, contexts)) if any(not 0 <= s < len(c) for s in a["answer_start"])]
    if outside:
        fail(table, "answers", outside, "answer_start outside the context",
             "answer_start counts characters from the start of the context (0-based) and must fall inside it.")
    missing = [i for i, (a, c) in enumerate(zip(answers, contexts))
               if any(c[s:s + len(t)] != t for t, s in zip(a["text"], a["answer_start"]))]
    if missing:
        fail(table, "answers", missing, "answer text not found at its answer_start",
             "context[answer_start : answer_start + len(text)] must equal the answer text.")


def _answer_shaped(answer) -> bool:
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), list) or not isinstance(answer.get("answer_start"), list):
        return False
    texts, starts = answer["text"], answer["answer_start"]
    return (len(texts) == len(starts) > 0 and all(isinstance(t, str) and t for t in texts)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in starts))


def check_query_pairs(table: Table, required: bool) -> None:
    """A query needs its document and the reverse; a row may have neither unless ``required`` (no text column)."""
    queries, documents = table.columns["query"], table.columns["document"]
    half = [i for i, (q, d) in enumerate(zip(queries, documents)) if blank(q) != blank(d)]
    if half:
        column = "document" if not blank(queries[half[0]]) else "query"
        fail(table, column, half, "a query without its document (or a document without its query)",
             "Give both in a row, or neither where the row has a text.", {i: (queries[i], documents[i]) for i in half})
    neither = {i for i, q in enumerate(queries) if blank(q)}
    for column in ("query", "document"):
        check_texts(table, column, optional_rows=set() if required else neither)


# --- labels ---------------------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"LABEL_\d+")


def kind(value) -> str:
    """The type of one label (or tag) as the user wrote it."""
    if blank(value):
        return "blank"
    if isinstance(value, bool):
        return "boolean"
    for name, types in (("integer", int), ("float", float), ("string", str), ("list", list)):
        if isinstance(value, types):
            return name
    return type(value).__name__


def fail_items(table: Table, column: str, items, bad, problem: str, allowed: str) -> None:
    """``fail`` over label items ((row, value) pairs, several per row for tags and multi-labels) where ``bad(value)``.

    Each row shown quotes its first bad value, not the whole list.
    """
    first: dict[int, object] = {}
    for row, value in items:
        if bad(value):
            first.setdefault(row, value)
    if first:
        fail(table, column, sorted(first), problem, allowed, first)


def one_kind(table: Table, column: str, items: list[tuple[int, object]], allowed: tuple[str, ...], what: str) -> str | None:
    """The single kind of ``items``; blank, unsupported or mixed kinds are an error."""
    kinds = [kind(v) for _, v in items]
    for bad_kind in ("blank", *sorted(set(kinds) - set(allowed) - {"blank"})):
        fail_items(table, column, items, lambda v: kind(v) == bad_kind, f"{bad_kind} {what}s",
                   f"Every {what} must be one of these types: {', '.join(allowed)}; none may be blank.")
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    if len(counts) > 1:
        rare = min(counts, key=counts.get)
        mix = ", ".join(f"{k}: {n}" for k, n in counts.items())
        fail_items(table, column, items, lambda v: kind(v) == rare, f"mixed {what} types ({mix}); the {rare} ones are",
                   "Use one type for the whole column.")
    return kinds[0] if kinds else None


def label_names_for(strings: set[str], label_names, model_label_names, token: bool) -> tuple[str, ...]:
    """Names for string labels: the job's list, else the model's real names, else (no head) the data's."""
    if label_names:
        return tuple(label_names)
    if model_label_names is None:
        if token and "O" in strings:
            return ("O", *sorted(strings - {"O"}))
        return tuple(sorted(strings))
    if all(PLACEHOLDER.fullmatch(n) for n in model_label_names):
        raise ValueError(
            f"the model's labels are placeholders {list(model_label_names)} but the data's labels are strings "
            f"{sorted(strings)}: say which id each one is with label_names = [the name of id 0, id 1, ...] in the model's own order "
            "(the order its head was trained with; alphabetical would be a guess that may swap classes)")
    return tuple(model_label_names)


def check_known(table: Table, column: str, items, names: tuple[str, ...], source: str) -> None:
    """Every string label is one of ``names``; integer labels are ids within them."""
    unknown = lambda v: isinstance(v, str) and v not in names  # noqa: E731
    distinct = sorted({v for _, v in items if unknown(v)})
    fail_items(table, column, items, unknown, f"labels the model does not have {distinct}", f"The labels ({source}) are {list(names)}.")
    fail_items(table, column, items, lambda v: isinstance(v, int) and not 0 <= v < len(names), "class ids outside the labels",
               f"Ids must be in 0..{len(names) - 1}, one per label {list(names)} ({source}).")


def resolve_labels(tables: dict[str, Table], token: bool, label_names, model_label_names, log) -> tuple[tuple[str, ...], str | None]:
    """Names and problem type from all splits together; labels (tags) are replaced by ids, multi-hot rows or floats.

    Checks first, per file: no blank labels, one type per column, every string a known name, every id in range.
    """
    column, what = ("tags", "tag") if token else ("label", "label")
    items, kinds = {}, {}
    for split, table in tables.items():
        if not token:
            decode_labels(table, column, tuple(label_names or model_label_names or ()))
        rows = list(enumerate(table.columns[column]))
        outer = "list" if token else one_kind(table, column, rows, ("string", "integer", "list", "float"), what)
        items[split] = [(r, x) for r, values in rows for x in values] if outer == "list" else rows
        inner = one_kind(table, column, items[split], ("string", "integer"), what) if outer == "list" else outer
        kinds[split] = (outer, inner)
    outer, inner = _agreed_kind(tables, kinds, what)
    if outer == "float":
        if label_names:
            raise ValueError(f"the {what}s are floats, i.e. regression targets, which have no label names; drop label_names")
        for table in tables.values():
            table.columns[column] = [float(v) for v in table.columns[column]]
        log("labels: floats, a regression target (1 output)")
        return (), "regression"
    names, source = _names(inner, [v for rows in items.values() for _, v in rows], label_names, model_label_names, token)
    ids = {name: i for i, name in enumerate(names)}

    def as_id(value) -> int:
        return ids[value] if isinstance(value, str) else value

    for split, table in tables.items():
        check_known(table, column, items[split], names, source)
        if token:
            table.columns[column] = [[as_id(v) for v in tags] for tags in table.columns[column]]
        elif outer == "list":  # multi-hot rows of floats, as HF's multi-label loss expects
            hot = [{as_id(v) for v in row} for row in table.columns[column]]
            table.columns[column] = [[float(i in row) for i in range(len(names))] for row in hot]
        else:
            table.columns[column] = [as_id(v) for v in table.columns[column]]
    problem = None if token else "multi_label" if outer == "list" else "single_label"
    log(f"labels: {len(names)} {what} names {list(names)} ({source}){', ' + problem if problem else ''}")
    return names, problem


def _agreed_kind(tables, kinds, what) -> tuple[str, str | None]:
    """The one label type of all files; an empty multi-label file (no labels at all) agrees with any list type."""
    outers = {k[0] for k in kinds.values() if k[0] is not None}
    inners = {k[1] for k in kinds.values() if k[1] is not None}
    if len(outers) > 1 or len(inners) > 1:
        described = {s: f"lists of {inner}s" if outer == "list" and inner else "empty lists" if outer == "list" else f"{outer}s"
                     for s, (outer, inner) in kinds.items()}
        found = "; ".join(f"{tables[s].file} has {d}" for s, d in described.items())
        raise ValueError(f"mixed {what} types between files: {found}. Use one type in every file.")
    return outers.pop(), (inners.pop() if inners else None)


def _names(kind, values, label_names, model_label_names, token) -> tuple[tuple[str, ...], str]:
    """Label names and where they came from: the job's label_names, the model's id2label, or the data."""
    if kind == "string":
        names = label_names_for({v for v in values if isinstance(v, str)}, label_names, model_label_names, token)
    else:  # class ids (or no labels at all): names are only needed for their count
        names = tuple(label_names or model_label_names or (str(i) for i in range(max(values, default=-1) + 1)))
    source = "from label_names" if label_names else "from the data" if model_label_names is None else "the model's id2label"
    return tuple(names), source
