"""Symbolic shapes: naming the batch and sequence dimensions, and re-deriving shapes.

Exported graphs carry ``node.meta["val"]``, a FakeTensor whose sizes are sympy
symbols (``s18``, ``s41``). Metadata and FLOP formulas use the names ``batch`` and
``seq`` instead, read off the token inputs. After a checkpoint is loaded (or a pass
changes shapes) :func:`propagate_shapes` recomputes ``val`` with fresh symbols.
"""

from __future__ import annotations

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .fx_utils import module_device

BATCH = sympy.Symbol("batch")
SEQ = sympy.Symbol("seq")
_DIM_SYMBOLS = (BATCH, SEQ)


def input_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def dim_names(gm: fx.GraphModule) -> dict[sympy.Symbol, sympy.Symbol]:
    """Map the graph's shape symbols to ``batch`` (dim 0) and ``seq`` (dim 1) of its 2-D inputs."""
    names: dict[sympy.Symbol, sympy.Symbol] = {}
    for node in input_placeholders(gm):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 2:
            for size, name in zip(val.shape, _DIM_SYMBOLS):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if isinstance(expr, sympy.Symbol):
                        names.setdefault(expr, name)
    return names


def size_expr(size, names) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr).xreplace(names)
    return sympy.Integer(int(size))


def shape_list(val: torch.Tensor, names) -> list[int | str]:
    """A JSON-able shape: ints where static, expressions such as ``'seq'`` where symbolic."""
    out: list[int | str] = []
    for size in val.shape:
        expr = size_expr(size, names)
        out.append(int(expr) if expr.is_Integer else str(expr))
    return out


def propagate_shapes(gm: fx.GraphModule, inputs: list[dict]) -> None:
    """Recompute ``meta["val"]`` on every node with symbolic ``batch``/``seq`` sizes.

    ``inputs`` describes the placeholders in order: ``{"dims": [...], "dtype": "int64"}``
    where a dim is an int or one of ``"batch"``/``"seq"``. The inputs are made on the
    device of ``gm``'s tensors: fake tensors refuse to mix devices, as real ones do.
    """
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    symbols: dict[str, torch.SymInt] = {}
    hints = {"batch": 2, "seq": 8}

    def symint(name: str) -> torch.SymInt:
        if name not in symbols:
            sym = shape_env.create_unspecified_symbol(hints[name], dynamic_dim=_dynamic(), source=_source(name))
            symbols[name] = shape_env.create_symintnode(sym, hint=hints[name])
        return symbols[name]

    device = module_device(gm)
    fakes = []
    with mode:
        for spec in inputs:
            dims = [symint(d) if isinstance(d, str) else d for d in spec["dims"]]
            dtype = getattr(torch, spec["dtype"])
            fakes.append(torch.empty(dims, dtype=dtype, device=device))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)


def _dynamic():
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    return DimDynamic.DYNAMIC


def _source(name: str):
    from torch._dynamo.source import ConstantSource

    return ConstantSource(name)


def refresh_shapes(gm: fx.GraphModule, nodes: list[fx.Node] | None = None) -> None:
    """Recompute ``meta["val"]`` after a pass added or changed nodes, from the inputs' current shapes.

    With ``nodes`` (in any order), only those are recomputed, from their inputs'
    current values and in the fake mode those values live in: a structural edit
    that changes a few shapes need not re-run the whole graph (seconds at bert-base
    size). Every other node must still have its right value.
    """
    if nodes is not None and _refresh_some(gm, nodes):
        return
    names = dim_names(gm)
    inputs = []
    for node in input_placeholders(gm):
        val = node.meta["val"]
        inputs.append({"dims": [str(d) if not isinstance(d, int) else d for d in shape_list(val, names)], "dtype": str(val.dtype).removeprefix("torch.")})
    propagate_shapes(gm, inputs)


def _refresh_some(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Fake-propagate just ``nodes``; False (do it all) if the existing values have no common fake mode."""
    from torch._guards import detect_fake_mode

    values = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    try:
        mode = detect_fake_mode(values)
    except AssertionError:  # values from more than one fake mode
        return False
    if mode is None:
        return False
    wanted = set(nodes)
    prop = FakeTensorProp(gm, mode)
    prop.env = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta and n not in wanted}
    # Encoder layers repeat: after an even edit most recomputed nodes see the same input
    # shapes as one already done. Building a fake output with symbolic strides costs
    # milliseconds even on a fake-mode cache hit, so equal computations share one value.
    done: dict[tuple, object] = {}
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # the modules' real parameters meet fake inputs
    try:
        with mode:
            for node in gm.graph.nodes:
                if node not in wanted:
                    continue
                signature = _signature(gm, node, prop.env)
                if signature is not None and signature in done:
                    value = done[signature]
                else:
                    value = _fake_run(gm, node, prop)
                    if signature is not None:
                        done[signature] = value
                node.meta["val"] = prop.env[node] = value
    finally:
        mode.allow_non_fake_inputs = allowed
    return True


def _fake_run(gm: fx.GraphModule, node: fx.Node, prop: FakeTensorProp):
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(module, torch.nn.Linear):
        # its output is its input with out_features last: no need to push the real
        # weight through fake mode (converting it costs tens of ms per call)
        x = prop.env[node.args[0]]
        return x.new_empty((*x.shape[:-1], module.out_features))
    return prop.run_node(node)


# modules whose output shape follows from their inputs' shapes alone
_SHAPE_ONLY_MODULES = ("Dropout", "AttentionCore", "GELU", "ReLU", "Tanh", "Identity")


def _signature(gm: fx.GraphModule, node: fx.Node, env: dict) -> tuple | None:
    """A hashable description of what ``node`` computes, from its inputs' shapes; None if unsure."""
    if node.op == "call_function":
        what = node.target
    elif node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            what = ("Linear", module.out_features)
        elif name in _SHAPE_ONLY_MODULES:
            what = (name,)
        else:
            return None
    else:
        return None
    try:
        return (node.op, what, _described(node.args, env), _described(tuple(sorted(node.kwargs.items())), env))
    except TypeError:  # something unhashable
        return None


def _described(value, env):
    if isinstance(value, fx.Node):
        val = env.get(value)
        if isinstance(val, torch.Tensor):
            return ("tensor", tuple(_expr(s) for s in val.shape), tuple(_expr(s) for s in val.stride()), val.dtype, _expr(val.storage_offset()))
        if isinstance(val, torch.SymInt | int):
            return ("int", _expr(val))
        raise TypeError("not described")
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_described(v, env) for v in value))
    if isinstance(value, torch.SymInt):
        return ("int", _expr(value))
    hash(value)
    return value


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size
