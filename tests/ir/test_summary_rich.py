"""``Summary`` on a terminal (a rich table) and off one (the plain text, every cell whole)."""

import io
import sys

import pytest
from rich.console import Console
from rich.table import Table

from graphprune.ir.summary import Summary, _fmt

LONG = "prune_weight(" + "x" * 100 + ")[0.5]-kept"  # 120 characters, no space for rich to wrap at
BOX = set("━─")


class FakeStdout(io.StringIO):
    """A stdout that says whether it is a terminal, and keeps what was written to it."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def per_layer() -> Summary:
    """A summary shaped like ``graph.summary()`` after pruning, with figures of every kind; it fits 80 columns."""
    columns = ["layer", "heads", "head_size", "ffn_width", "params", "flops", "weight_sparsity"]
    rows = [
        {"layer": "embeddings", "params": 1_200_000, "flops": 0},
        {"layer": "0", "heads": 4, "head_size": 8, "ffn_width": 64, "params": 12_608, "flops": 3.125e6, "weight_sparsity": 0.5},
        {"layer": "1", "heads": 3, "head_size": 8, "ffn_width": 48, "params": 9_000, "flops": 2.5e6, "weight_sparsity": 0.4688},
        {"layer": "[head]", "params": 1_122, "flops": 66},
        {"layer": "total", "params": 1_222_730, "flops": 5.625e6, "weight_sparsity": 0.4844},
    ]
    return Summary(title="BertForSequenceClassification [pruned]: FLOPs at batch 1, seq 16", columns=columns, rows=rows)


def with_long_cell() -> Summary:
    return Summary(title="search: Pareto front", columns=["trial", "pipeline", "accuracy"],
                   rows=[{"trial": 3, "pipeline": LONG, "accuracy": 0.8125}, {"trial": 7, "pipeline": "prune_weight", "accuracy": 0.75}],
                   total_row=False)


def rich_text(summary, width=80) -> str:
    console = Console(force_terminal=True, width=width, record=True, file=io.StringIO())
    console.print(summary)
    return console.export_text()


def test_plain_text_keeps_a_long_cell_whole():
    text = str(with_long_cell())
    assert LONG in text and "…" not in text
    row = next(line for line in text.splitlines() if line.startswith("3 "))
    assert row.split() == ["3", LONG, "0.8125"]  # one line: the cell is not wrapped


def test_plain_text_layout_is_unchanged():
    # The layout logs and older tests read: title, header, dashes, rows, dashes before the total.
    lines = str(per_layer()).splitlines()
    assert lines[0] == per_layer().title
    assert lines[1].split() == per_layer().columns
    assert set(lines[2].replace(" ", "")) == {"-"} and lines[-2] == lines[2]
    assert lines[-1].split() == ["total", "-", "-", "-", "1.22M", "5.625e+06", "0.4844"]
    assert [line.split()[0] for line in lines[3:-2]] == ["embeddings", "0", "1", "[head]"]


def test_rich_renders_a_table_with_every_header_and_value():
    summary = per_layer()
    assert isinstance(summary.__rich__(), Table)
    text = rich_text(summary)
    assert summary.title in text  # brackets in the title are not read as markup
    for column in summary.columns:
        assert column in text
    for row in summary.rows:
        for column in summary.columns:
            assert _fmt(row.get(column)) in text
    assert "[head]" in text and BOX & set(text) and "…" not in text  # a cell in brackets is not markup either
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if "─" in line)
    assert lines[rule + 1].split()[0] == "total"  # the total set off by a rule, as in the plain text


def test_rich_on_a_narrow_terminal_folds_a_long_cell_but_keeps_every_character():
    summary = with_long_cell()
    text = rich_text(summary, width=60)
    assert "…" not in text
    assert all(len(line.rstrip()) <= 60 for line in text.splitlines())
    # The long cell spans several lines; read its column back and join the pieces.
    header = next(line for line in text.splitlines() if line.startswith("trial"))
    start, end = len("trial"), header.index("accuracy")  # numbers are right-aligned: the column starts after "trial"
    first = next(i for i, line in enumerate(text.splitlines()) if line.startswith("3 "))
    pieces = []
    for line in text.splitlines()[first:]:
        if line.startswith("7 "):
            break
        pieces.append(line[start:end].strip())
    assert "".join(pieces) == LONG


@pytest.mark.parametrize("tty", [True, False])
def test_show_chooses_by_isatty(monkeypatch, tty):
    summary = per_layer()
    fake = FakeStdout(tty)
    monkeypatch.setattr(sys, "stdout", fake)
    summary.show()
    out = fake.getvalue()
    if tty:
        assert BOX & set(out) and "----------" not in out
        assert all(column in out for column in summary.columns) and summary.title in out
    else:
        assert out == str(summary) + "\n"


def test_show_off_a_terminal_prints_a_long_cell_whole(monkeypatch):
    fake = FakeStdout(False)
    monkeypatch.setattr(sys, "stdout", fake)
    with_long_cell().show()
    assert LONG in fake.getvalue() and "…" not in fake.getvalue()


def test_a_log_callback_gets_the_plain_text_even_on_a_terminal(monkeypatch):
    summary = with_long_cell()
    fake = FakeStdout(True)
    monkeypatch.setattr(sys, "stdout", fake)
    lines = []
    summary.show(log=lines.append)
    assert lines == [str(summary)] and fake.getvalue() == ""


def test_show_when_stdout_has_no_isatty(monkeypatch):
    class Bare:  # some wrappers (a notebook's, a logging redirect) lack isatty
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)

        def flush(self):
            pass

    bare = Bare()
    monkeypatch.setattr(sys, "stdout", bare)
    per_layer().show()
    assert "".join(bare.parts) == str(per_layer()) + "\n"


def test_a_real_graph_summary_renders_both_ways(tiny_graph):
    summary = tiny_graph.summary(seq_len=16)
    text = rich_text(summary)
    for column in summary.columns:
        assert column in text
    for row in summary.rows:
        assert row["layer"] in text and _fmt(row["params"]) in text and _fmt(row["flops"]) in text
    plain = str(summary)
    assert all(_fmt(row["flops"]) in plain for row in summary.rows)
