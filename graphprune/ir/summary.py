"""``graph.summary()``: a per-layer table that prints well in a terminal."""

from __future__ import annotations

import sys

import torch

from dataclasses import dataclass, field
from typing import Callable

from .metadata import COMMON, evaluate

# How to compute the common metadata a summary needs when a graph lacks it. That is
# the ``add_common_metadata`` pass, run by the pass infrastructure, a layer above
# this one; it installs the function here (see ``graphprune.infra.pipeline``).
_common_metadata: Callable | None = None


def set_common_metadata_provider(provider: Callable) -> None:
    """Install ``provider(graph) -> graph with meta["common"]`` for :func:`summarize` to call."""
    global _common_metadata
    _common_metadata = provider


@dataclass
class Summary:
    """Rows of per-layer figures; ``str(summary)`` is an aligned text table.

    ``rows`` is a list of dicts with the keys in ``columns``; ``totals`` holds the
    whole-graph figures. Later passes add columns (sparsity, quantization).

    ``summary.show()`` prints a ``rich`` table on a terminal and the plain text
    elsewhere (pipes, log files); ``rich.print(summary)`` renders the rich table.
    The plain text never cuts or wraps a cell, so a log keeps every figure.

    Example:
        >>> summary = graph.summary(seq_len=128)
        >>> summary.show()                   # rich on a terminal, plain text in a log
        >>> summary.show(log=lines.append)   # a callback always gets the plain text
    """

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    total_row: bool = True  # the last row is a total, set off by a rule

    def __str__(self) -> str:
        cells = [[_fmt(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]  # no rows: the header
        line = "  ".join("-" * w for w in widths)

        def render(values):
            return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

        if self.total_row and cells:
            body = [render(self.columns), line] + [render(r) for r in cells[:-1]] + [line, render(cells[-1])]
        else:
            body = [render(self.columns), line] + [render(r) for r in cells]
        return "\n".join([self.title] + body)

    def __rich__(self):
        """The table as a ``rich.table.Table``: the same columns and cells as ``str(summary)``."""
        return self._rich_table(title=True)

    def _rich_table(self, *, title: bool):
        # Imported here: rich is only needed when a table is drawn, and a plain
        # ``import graphprune`` should not pay for it.
        from rich.box import Box
        from rich.table import Table
        from rich.text import Text

        # Rules under the header and above the total only, and cells two spaces
        # apart: as wide as the plain text, so a terminal that fits one fits both.
        rules = Box("    \n    \n ━━ \n    \n ── \n    \n    \n    \n")
        # Text, not str: a cell such as "prune_weight[0.5]" or a title with brackets
        # must print as written, not be read as rich markup.
        table = Table(title=Text(self.title) if title else None, title_justify="left", header_style="bold", box=rules,
                      show_edge=False, pad_edge=False, collapse_padding=True)
        for i, column in enumerate(self.columns):
            # fold, not rich's default ellipsis: on a narrow terminal a cell breaks
            # onto more lines but keeps every character.
            table.add_column(Text(column), justify="right" if i else "left", overflow="fold")
        cells = [[_fmt(row.get(c)) for c in self.columns] for row in self.rows]
        for k, values in enumerate(cells):
            total = self.total_row and k == len(cells) - 1
            table.add_row(*map(Text, values), style="bold" if total else None,
                          end_section=self.total_row and k == len(cells) - 2)
        return table

    def show(self, log: Callable[[str], object] = print) -> None:
        """Print the table: with rich when ``log`` is ``print`` and stdout is a terminal, else ``log(str(self))``.

        A ``log`` other than ``print`` (a callback collecting lines, a logger) always
        gets the plain text, which a file or a test can read back.
        """
        stream = sys.stdout
        isatty = getattr(stream, "isatty", None)
        if log is print and isatty is not None and isatty():
            from rich.console import Console
            from rich.text import Text

            console = Console(file=stream)
            # The title on a line of its own: a table's title wraps at the table's
            # width, and a narrow table under a long title would break it into many lines.
            console.print(Text(self.title, style="bold"))
            console.print(self._rich_table(title=False))
        else:
            log(str(self))

    def _repr_pretty_(self, printer, cycle):  # IPython
        printer.text(str(self))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.2f}{unit}"
    return str(value)


def summarize(graph, *, seq_len: int | None = None, batch_size: int | None = None) -> Summary:
    meta = graph.meta.get(COMMON)
    if not meta or "layers" not in meta:
        if _common_metadata is None:
            raise RuntimeError("graph.summary() needs the add_common_metadata pass: run it first, or import graphprune")
        graph = _common_metadata(graph)  # analysis on a copy: summary() never changes the graph
        meta = graph.meta[COMMON]
    seq = seq_len or meta["seq_len"]
    batch = batch_size or meta["batch_size"]
    summary = Summary(
        title=f"{meta.get('model_class') or 'graph'}: FLOPs at batch {batch}, seq {seq}" + _lowered_note(graph.meta.get("lowered")),
        columns=["layer", "heads", "head_size", "ffn_width", "params", "flops"],
    )

    def flops(entry):
        return evaluate(entry["flops_expr"], batch=batch, seq=seq)

    summary.rows.append({"layer": "embeddings", "params": meta["embeddings"]["params"], "flops": flops(meta["embeddings"])})
    for row in meta["layers"]:
        summary.rows.append({**{k: row[k] for k in ("heads", "head_size", "ffn_width", "params")}, "layer": str(row["index"]), "flops": flops(row)})
    summary.rows.append({"layer": "head", "params": meta["head"]["params"], "flops": flops(meta["head"])})
    summary.totals = {"params": meta["totals"]["params"], "flops": flops(meta["totals"])}
    summary.rows.append({"layer": "total", **summary.totals})
    _add_sparsity(summary, graph.meta.get("sparsity"))
    _add_quantization(summary, graph.meta.get("quantize"))
    _add_gates(summary, graph)
    return summary


def _add_gates(summary: Summary, graph) -> None:
    """A ``gates`` column (what the gates keep at evaluation) and the expected size, while gates are on the graph."""
    from .gates import GATES, gate_method

    method = gate_method(graph)
    if method is None:
        return
    record = graph.meta[GATES]
    with torch.no_grad():
        expected = float(method.expected_fraction(graph))
    summary.title += f"; {method.name} gates: expected {expected:.3f} of the {record.get('metric', 'size')} kept, target {record['target']:.3f}"
    if method.describe is None:
        return
    rows = method.describe(graph)
    summary.columns.append("gates")
    for row in summary.rows:
        found = rows.get(row["layer"])
        if found:
            row["gates"] = "; ".join(f"{v}" for v in found.values())


def _lowered_note(lowered: dict | None) -> str:
    if not lowered:
        return ""
    scales = f", {lowered['activations']} activation scales" if lowered.get("activations") else ""
    scheme = f", scheme {lowered['scheme']}" if lowered.get("scheme") else ""
    return f"; lowered: {lowered['lowered_linears']} Linears on {lowered['precision']} kernels{scales}{scheme}"


def _add_sparsity(summary: Summary, sparsity: dict | None) -> None:
    """Weight and activation sparsity columns, when ``add_sparsity_metadata`` (or a pruning pass) recorded them."""
    if not sparsity or "layers" not in sparsity:
        return
    summary.columns += ["weight_sparsity", "act_sparsity"]
    by_layer = {str(row["index"]): row for row in sparsity["layers"]}
    if sparsity.get("head"):
        by_layer["head"] = sparsity["head"]
    for row in summary.rows:
        found = by_layer.get(row["layer"])
        if found is not None:
            row["weight_sparsity"] = round(found["weight_sparsity"], 4)
            row["act_sparsity"] = round(found["activation_sparsity"], 4)
    summary.rows[-1]["weight_sparsity"] = round(sparsity["totals"]["weight_sparsity"], 4)


def _add_quantization(summary: Summary, quantize: dict | None) -> None:
    """Format and average-bits columns, when the ``quantize`` pass (or ``add_quantization_metadata``) recorded them."""
    if not quantize or "totals" not in quantize:
        return
    summary.columns += ["quant", "w_bits", "act_bits"]
    by_layer = {str(row["index"]): row for row in quantize["layers"]}
    for name in ("embeddings", "head"):
        if quantize.get(name):
            by_layer[name] = quantize[name]
    by_layer["total"] = quantize["totals"]
    for row in summary.rows:
        found = by_layer.get(row["layer"])
        if found is not None:
            row["quant"] = "+".join(found["formats"]) or None
            row["w_bits"] = _round(found["weight_bits"])
            row["act_bits"] = _round(found["activation_bits"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
