"""Markdown from a benchmark's JSON, whatever its shape: tables, key/value lists, claims, settings.

``bench/results_pages.py`` assembles the pages; this module knows nothing of any one
benchmark. Lists of dicts become tables, dicts of dicts keyed by name become tables,
scalars a key/value list, and anything deeper its own section. Order is the JSON's own,
so the same file always gives the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

CLAIM_KEYS = ("targets", "target", "claims")  # where the benchmarks record their targets and verdicts
# a record with none of these (a summary per ISA cap, say) is drawn as a table, not counted as a claim
CLAIM_FIELDS = {"met", "value", "target"}
DATE_KEYS = ("date", "finished", "timestamp", "started")
DASH = "—"


def fmt(value) -> str:
    """One value as text: floats rounded to what a reader compares (4 significant digits below 1)."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 100_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value) if value else "0"
        size = abs(value)
        text = f"{value:.0f}" if size >= 1000 else f"{value:.1f}" if size >= 100 else f"{value:.3f}" if size >= 1 else f"{value:.4g}"
        return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return str(value)


def escape(text: str) -> str:
    """Text safe inside a Markdown table cell or list item: no column breaks, tags, emphasis or links."""
    for old, new in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), ("*", "\\*"), ("[", "\\["), ("`", "\\`"), ("\n", " ")):
        text = text.replace(old, new)
    return text


def scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def inline(value) -> bool:
    """Whether a value fits in one cell: a scalar, a list of scalars, or a dict of scalars."""
    if isinstance(value, list):
        return all(scalar(v) for v in value)
    if isinstance(value, dict):
        return all(scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v)) for v in value.values())
    return scalar(value) and not (isinstance(value, str) and "\n" in value)


def title(key: str) -> str:
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def machine_line(machine: dict | None, torch: str | None = None) -> str:
    """The machine as the JSON records it, in the order the benchmarks print it."""
    if not machine:
        return "not recorded"
    m = dict(machine)
    head = f"CPU: {m['cpu']}" if m.get("cpu") else "CPU: not recorded"
    if m.get("cores"):
        head += f", {m['cores']} cores"
    if m.get("flags"):
        head += f", flags {' '.join(m['flags'])}"
    parts = [head] + [f"{k} {m[k]}" for k in ("processor", "machine") if m.get(k)]
    if m.get("onednn_isa"):
        cap = f" (capped by ONEDNN_MAX_CPU_ISA={m['isa_cap']})" if m.get("isa_cap") else ""
        says = f" (oneDNN says: {m['onednn_dispatched']})" if m.get("onednn_dispatched") else ""
        parts.append(f"oneDNN ISA {m['onednn_isa']}{cap}{says}")
    if m.get("int8_scheme"):
        parts.append(f"int8 scheme {m['int8_scheme']}")
    if "native_bf16" in m:
        parts.append(f"native bf16 {fmt(m['native_bf16'])}")
    torch = m.get("torch") or torch
    if torch or m.get("threads"):
        parts.append(", ".join(p for p in (f"torch {torch}" if torch else "", f"{m['threads']} threads" if m.get("threads") else "") if p))
    return "; ".join(parts)


def machine_of(data: dict) -> dict | None:
    """The run's machine; a benchmark of several runs (one per ISA cap) records it per run: the first."""
    if isinstance(data.get("machine"), dict):
        return data["machine"]
    runs = data.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[0], dict):
        return runs[0].get("machine")
    return None


def date_of(data: dict) -> str | None:
    return next((str(data[k]) for k in DATE_KEYS if scalar(data.get(k)) and data.get(k)), None)


def flatten(row: dict, prefix: str = "", depth: int = 0) -> tuple[dict, list[str]]:
    """A row's cells with nested dicts as dotted columns; what does not fit a cell is named, not shown."""
    cells, dropped = {}, []
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key == "machine" and isinstance(value, dict):
            cells[name] = value.get("cpu") or value.get("processor")
        elif isinstance(value, dict) and depth < 2:
            sub, lost = flatten(value, name + ".", depth + 1)
            cells.update(sub)
            dropped += lost
        elif inline(value) and not isinstance(value, dict):
            cells[name] = value
        else:
            dropped.append(name)
    return cells, dropped


def table(rows: list[dict], name_column: str | None = None, names: list[str] | None = None) -> list[str]:
    """A Markdown table over the union of the rows' columns, in first-seen order."""
    flat, dropped = [], []
    for row in rows:
        cells, lost = flatten(row)
        flat.append(cells)
        dropped += [d for d in lost if d not in dropped]
    columns = list(dict.fromkeys(k for cells in flat for k in cells))
    # a field that is a dict in some rows and null in others: its dotted columns say it all
    columns = [c for c in columns if c not in dropped and not (any(o.startswith(c + ".") for o in columns) and all(f.get(c) is None for f in flat))]
    if name_column:
        columns = [name_column] + columns
        flat = [{name_column: n, **cells} for n, cells in zip(names, flat)]
    lines = ["| " + " | ".join(escape(str(c)) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(fmt(cells.get(c))) if c in cells else "" for c in columns) + " |" for cells in flat]
    if dropped:
        lines += ["", "Not shown here (nested; see the JSON): " + ", ".join(f"`{d}`" for d in dropped) + "."]
    return lines


def code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def key_values(values: dict) -> list[str]:
    """Scalars as a list; multi-line strings (a job file) as their own code block after it."""
    lines, blocks = [], []
    for key, value in values.items():
        if isinstance(value, str) and "\n" in value:
            blocks += ["", f"`{key}`:", "", "```", value.strip("\n"), "```"]
        elif inline(value):
            lines.append(f"- `{key}`: {escape(fmt(value))}")
        else:
            lines.append(f"- `{key}`: {code(json.dumps(value))}")
    return lines + blocks


def dict_of_rows(value: dict) -> bool:
    return len(value) >= 2 and all(isinstance(v, dict) and all(inline(x) for x in v.values()) for v in value.values())


def section(key: str, value, level: int, path: tuple, skip: set) -> list[str]:
    """A heading for ``key`` and its value: a table, a key/value list, or subsections."""
    heading = ["", "#" * min(level, 6) + " " + escape(title(key) if level <= 2 else str(key)), ""]
    if isinstance(value, list):
        if not value:
            return heading + ["(none)"]
        if all(isinstance(v, dict) for v in value):
            nested = any(isinstance(x, list) and x and isinstance(x[0], dict) for v in value for x in v.values())
            if not nested:
                return heading + table(value)
            out = heading.copy()
            for i, item in enumerate(value):  # items with tables of their own: one subsection each
                label = next((f"{k} {v}" for k, v in item.items() if isinstance(v, str)), f"{i + 1}")
                out += section(f"{key} {i + 1}: {label}" if not label.isdigit() else f"{key} {label}", item, level + 1, path + (i,), skip)
            return out
        return heading + key_values({key: value})
    if not isinstance(value, dict):
        return heading + key_values({key: value})
    shown = {k: v for k, v in value.items() if path + (k,) not in skip and k != "machine"}
    if dict_of_rows(shown):  # a dict of dicts keyed by name
        return heading + table(list(shown.values()), "name", list(shown))
    rows = [k for k, v in shown.items() if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    flat = {k: v for k, v in shown.items() if k not in rows or inline(v)}
    nested = {k: v for k, v in shown.items() if k not in flat}
    out = heading.copy()
    if isinstance(value.get("machine"), dict):
        out += [f"Machine: {escape(machine_line(value['machine']))}", ""]
    out += key_values(flat)
    if not flat and len(nested) == 1:
        ((k, v),) = nested.items()
        return section(f"{key}: {k}", v, level, path + (k,), skip)
    for k, v in nested.items():
        out += section(k, v, level + 1, path + (k,), skip)
    return out


@dataclass
class Claim:
    name: str
    verdict: bool | None  # None: the JSON records no verdict for it
    value: object = None
    target: object = None
    details: dict = field(default_factory=dict)


def _claim(name: str, record: dict) -> list[Claim]:
    subs = {k: v for k, v in record.items() if isinstance(v, dict) and "met" in v}
    details = {k: v for k, v in record.items() if k not in subs and k not in ("met", "value", "target")}
    met = record.get("met")
    own = Claim(name, met if isinstance(met, bool) else None, record.get("value"), record.get("target"), details)
    return [own] + [c for k, v in subs.items() for c in _claim(f"{name}.{k}", v)]


def find_claims(data: dict, path: tuple = ()) -> tuple[list[Claim], set]:
    """Every target the JSON records, with its verdict; and the paths they came from (not drawn twice)."""
    claims, skip = [], set()
    for key, value in data.items():
        if not isinstance(value, dict) or key == "machine":
            continue
        name = ".".join(map(str, path + (key,)))
        if key in CLAIM_KEYS and "met" in value:
            skip.add(path + (key,))
            claims += _claim(name, value)
        elif key in CLAIM_KEYS and any(isinstance(v, dict) and CLAIM_FIELDS & set(v) for v in value.values()):
            skip.add(path + (key,))  # a dict of targets keyed by name
            prefix = ".".join(map(str, path)) + "." if path else ""
            claims += [c for k, v in value.items() for c in (_claim(prefix + k, v) if isinstance(v, dict) else [Claim(prefix + k, None, v)])]
        else:
            sub, sub_skip = find_claims(value, path + (key,))
            claims, skip = claims + sub, skip | sub_skip
    return claims, skip


def tally(claims: list[Claim]) -> tuple[int, int, int]:
    """(met, not met, without a recorded verdict)."""
    return (sum(c.verdict is True for c in claims), sum(c.verdict is False for c in claims), sum(c.verdict is None for c in claims))


def tally_text(claims: list[Claim]) -> str:
    if not claims:
        return "no claims recorded"
    met, missed, unknown = tally(claims)
    return ", ".join(t for t in (f"{met} met", f"{missed} not met", f"{unknown} without a recorded verdict" if unknown else "") if t)


def detail(value) -> str:
    if not inline(value):
        return json.dumps(value)
    return f"({fmt(value)})" if isinstance(value, dict) else fmt(value)


def claims_table(claims: list[Claim]) -> list[str]:
    verdicts = {True: "met", False: "**not met**", None: "not recorded"}
    lines = ["| Claim | Value | Target | Met | Details |", "|---|---|---|---|---|"]
    for c in claims:
        cells = [code(c.name), escape(fmt(c.value)), escape(fmt(c.target)), verdicts[c.verdict],
                 escape("; ".join(f"{k}: {detail(v)}" for k, v in c.details.items()))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def settings_of(data: dict) -> dict:
    """What the run was asked to do, flat, for telling runs apart: machine fields, top-level scalars,
    ``settings``, and the fields every row of a table shares (a run's epochs, say)."""
    out = {f"machine.{k}": v for k, v in (machine_of(data) or {}).items() if k in ("cpu", "flags", "onednn_isa", "isa_cap")}
    for key, value in data.items():
        if key in ("machine", "seconds") or key in CLAIM_KEYS:
            continue
        if key == "settings" and isinstance(value, dict):
            out.update({f"settings.{k}": v for k, v in value.items()})
        elif not isinstance(value, dict) and (inline(value) or isinstance(value, str)):
            out[key] = value
        elif isinstance(value, list) and len(value) >= 2 and all(isinstance(v, dict) for v in value):
            shared = {k: v for k, v in value[0].items() if scalar(v) and all(r.get(k, object()) == v for r in value[1:])}
            out.update({f"{key}[*].{k}": v for k, v in shared.items()})
    return out


def differences(result: dict, other: dict, most: int = 8) -> list[str]:
    """How ``other``'s recorded settings differ from ``result``'s, as short phrases."""
    a, b = settings_of(result), settings_of(other)
    out = []
    for key in [k for k in b if k in a and a[k] != b[k]]:
        if isinstance(b[key], str) and "\n" in b[key] and isinstance(a[key], str):
            only = [ln.strip() for ln in b[key].splitlines() if ln.strip() and ln not in a[key].splitlines()]
            out.append(f"{code(key)} has {', '.join(code(x) for x in only[:4]) or 'the same lines, reordered'}{' …' if len(only) > 4 else ''}")
        else:
            out.append(f"{code(key)} {escape(fmt(b[key]))} (not {escape(fmt(a[key]))})")
    return out[:most] + ([f"{len(out) - most} more"] if len(out) > most else [])
