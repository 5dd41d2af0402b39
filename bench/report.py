"""Plain-text result tables, shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def table(rows: list[dict], columns: list[str], digits: int = 4) -> str:
    """Rows of dicts as aligned columns: floats to ``digits`` places, missing values as ``-``."""

    def cell(value) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Write ``results`` to ``path`` through a temporary file: never a half-written results file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def machine() -> dict:
    """The CPU, its flags, the ISA oneDNN dispatches to (asked of oneDNN) and torch: every result's header."""
    import torch

    from graphprune.ir.cpu import cpu_description

    return {**cpu_description(ask_onednn=True), "threads": torch.get_num_threads(), "torch": torch.__version__}


def machine_line(description: dict) -> str:
    """The header line a benchmark prints first."""
    from graphprune.ir.cpu import describe_line

    return f"{describe_line(description)}; torch {description['torch']}, {description['threads']} threads"


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure to ``path`` (PNG) through a temporary file, tightly laid out."""
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
