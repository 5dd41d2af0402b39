"""Where graphprune keeps metadata, and small helpers to read it.

Node metadata lives under one key per concern, ``node.meta["graphprune.<concern>"]``
(``graphprune.common`` for what ``add_common_metadata`` writes; later passes add
their own concerns). torch's keys (``val``, ``nn_module_stack``, ``stack_trace``)
are read, never written. Graph-level metadata lives in ``graph.meta[<concern>]``.
Everything stored here is JSON-able, so checkpoints carry it.
"""

from __future__ import annotations

from functools import lru_cache

import sympy
from torch import fx

PREFIX = "graphprune."
COMMON = "common"
# The Linear roles ``add_common_metadata`` gives inside an encoder layer (the roles pass names them).
ENCODER_ROLES = ("query", "key", "value", "attention_output", "ffn_up", "ffn_down")


def key(concern: str) -> str:
    return PREFIX + concern


def node_meta(node: fx.Node, concern: str) -> dict:
    """The metadata dict of ``concern`` on ``node``, created empty if missing."""
    return node.meta.setdefault(key(concern), {})


def common(node: fx.Node) -> dict:
    """What ``init_metadata``/``add_common_metadata`` recorded on ``node`` (empty if not run)."""
    return node.meta.get(key(COMMON), {})


def our_keys(node: fx.Node) -> list[str]:
    return [k for k in node.meta if isinstance(k, str) and k.startswith(PREFIX)]


@lru_cache(maxsize=4096)
def _parse(expr: str) -> sympy.Expr:
    return sympy.sympify(expr, locals={"batch": sympy.Symbol("batch"), "seq": sympy.Symbol("seq")})


def evaluate(expr: str | int | sympy.Expr, *, batch: int, seq: int) -> int:
    """Evaluate a size expression in ``batch`` and ``seq`` (as stored in metadata)."""
    if isinstance(expr, int):
        return expr
    value = (_parse(expr) if isinstance(expr, str) else expr).subs({sympy.Symbol("batch"): batch, sympy.Symbol("seq"): seq})
    value = value.subs({s: seq for s in value.free_symbols})  # stray export symbols are sequence-like
    return int(value)
