"""``lower``: the graph onto real int8 or bf16 CPU kernels, through torchao's pt2e flow and inductor.

Everything else in this family simulates formats in float. ``lower`` makes the graph
really faster:

- ``precision = "int8"`` (default): torchao's PT2E flow with its
  ``X86InductorQuantizer``. The graph's body is exported to ATen ops (dynamic batch
  and sequence), every encoder Linear gets int8 weights (per output channel, symmetric)
  and int8 inputs, with ``activations = "static"`` (default) per-tensor scales
  calibrated on ``num_samples`` examples of ``data``, or ``"dynamic"`` scales computed
  per call (no data needed). ``torch.compile`` with inductor's freezing then fuses each
  quantize / int8 matmul / dequantize into oneDNN int8 kernels. The int8 ``scheme``
  follows the CPU (``graphprune.ir.cpu``): ``"u8s8"`` (activations 0..255) where oneDNN
  accumulates in int32 (VNNI or AMX); where it does not (AVX2 or AVX-512 without VNNI)
  8-bit activations times 8-bit weights saturate the kernels' int16 pair sums and the
  compiled graph would not compute what its reference arithmetic says, so one side
  gives up a bit: ``"u8s7"`` (7-bit weights, -64..63; ``graphprune.ir.cpu.NON_VNNI_SCHEME``,
  chosen on the fine-tuned MiniLM by ``bench/int8_isa.py``: it stays as close to fp32
  as u8s8, where ``"u7s8"``, 7-bit activations or "reduce_range", is twice as far).
  ``ONEDNN_MAX_CPU_ISA`` (set before the process starts) is honoured, so
  ``ONEDNN_MAX_CPU_ISA=AVX2`` makes a VNNI machine lower as an AVX2 one.
  The classifier head (``skip``, default pooler and classifier) stays float: it
  is a sliver of the FLOPs and the layer most sensitive to rounding.
- ``precision = "bf16"``: every encoder Linear (``skip`` aside) gets bf16 weights and
  computes in bf16, its input cast down and its output cast back to fp32 (attention
  softmax, layer norm, residuals and the loss stay fp32, as autocast would keep them),
  compiled the same way; inductor fuses the casts into the neighbouring kernels.
  Needs a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX on x86, BF16 on Arm):
  without it bf16 is emulated and slower than fp32, so the pass stops and says so,
  unless ``allow_emulated_bf16 = true`` (for accuracy studies).

The result is still a :class:`graphprune.Graph`: ``graph.module`` is an ordinary
``GraphModule`` (ATen ops, int8 weights as constants) called exactly like the model,
compiled in place on first use; it evaluates, saves (int8 weights stored as int8,
about a quarter of fp32's bytes) and reloads (compiled again on load,
``graph.meta["runtime"]``). It runs inference only: call it under ``torch.no_grad()``
(``graphprune.training.evaluate`` does); ``graph.train()`` refuses, since kernels
without gradients cannot be fine-tuned. Fine-tune or run QAT first, then lower.

What it lowers from: any graph. Pruning masks and simulated weight formats are folded
into the weights first (so a QAT-trained graph is lowered with the weights it trained,
and pruned weights stay zero); simulated activation quantizers are removed (int8
replaces them); structurally pruned graphs (fewer heads, neurons, layers) lower as
they are. Per-node metadata is dropped (the nodes are new); ``graph.meta`` keeps the
architecture's (``summary()`` still works) and gains ``graph.meta["lowered"]``.

Requirements, checked before anything changes: an x86-64 CPU, torchao (``pip install torchao``) and a
C++ compiler for inductor (``g++``, ``clang++`` or ``$CXX``). A missing one is an error
naming it; there is never a silent fallback to fp32.

Config fields:
    precision: int8 (default) | bf16.
    activations: static (default, calibrated) | dynamic (int8 only).
    num_samples: calibration examples for static int8 (default 128).
    batch_size: examples per calibration batch (default: the CalibrationData's, 32).
    skip: module-name prefixes kept in float (default ["bert.pooler", "classifier"]
        and the same for other heads: any module whose path starts with one).
    compile: compile for speed (default true); false leaves the lowered graph eager
        (reference int8 arithmetic in float: same numbers, no speed-up).
    allow_emulated_bf16: lower to bf16 on a CPU without native bf16 (default false).
    scheme: int8 scheme, auto (default: from the CPU, as above) | u8s8 | u7s8 | u8s7.
        ``graph.meta["lowered"]`` records the scheme and the ISA it was chosen for; loading
        the graph where another scheme is needed warns.
    seed: for the calibration subset.

Example:
    >>> graph, info = graphprune.run_pass(graph, "lower", {"precision": "int8"}, data=splits["train"])
    >>> with torch.no_grad():
    ...     logits = graph.module(**batch).logits        # int8 kernels
    >>> graph.save("runs/minilm-int8")                  # int8 weights on disk
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
import warnings
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx import CodeGen
from tqdm.auto import tqdm

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir import cpu
from graphprune.ir.calls import install_model_call, model_call_of
from graphprune.ir.fx_utils import fetch_attr, replace_empty_linears
from graphprune.ir.masks import commit_masks
from graphprune.ir.metadata import our_keys
from graphprune.ir.modules import AttentionCore
from graphprune.ir.runtime import FLOAT_HEAD_PREFIXES, RUNTIME, apply_runtime, cxx_compiler, is_skipped
from graphprune.training.calibration import calibration_batches, model_inputs

from .quantizers import INSERTED, QuantizedAttentionCore, remove_inserted

NAME = "lower"
PRECISIONS = ("int8", "bf16")
ACTIVATIONS = ("static", "dynamic")
SCHEMES = ("auto", *cpu.SCHEMES)
DEFAULT_SKIP = FLOAT_HEAD_PREFIXES


class LowerError(RuntimeError):
    """Lowering is not possible here (a missing library, compiler or CPU feature)."""


@dataclass(frozen=True)
class LowerConfig:
    """Fields: precision, activations, num_samples, batch_size, skip, compile, allow_emulated_bf16, scheme, seed."""

    precision: str = "int8"
    activations: str = "static"
    num_samples: int = 128
    batch_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    compile: bool = True
    allow_emulated_bf16: bool = False
    scheme: str = "auto"
    seed: int = 0

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("activations", self.activations, ACTIVATIONS)
        check_choice("scheme", self.scheme, SCHEMES)
        if self.precision == "bf16" and self.scheme != "auto":
            raise ConfigError("scheme", self.scheme, "'auto' (the default) with precision 'bf16': schemes are int8's")
        if self.precision == "bf16" and self.activations != "static":
            raise ConfigError("activations", self.activations, "'static' (the default) with precision 'bf16': bf16 has no activation scales")
        check_range("num_samples", self.num_samples, 1)
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, 1)


# -- what the machine has ---------------------------------------------------------------


def _check_machine(config: LowerConfig) -> None:
    if not cpu.is_x86_64():
        raise LowerError(
            f"{NAME}: the int8 and bf16 kernels it lowers to are oneDNN's x86-64 kernels (torchao's "
            f"X86InductorQuantizer, inductor's CPU backend); this machine is {platform.machine()}. The rest of "
            "graphprune (tracing, pruning, simulated formats, fine-tuning, checkpoints) works here: lower on an x86-64 CPU"
        )
    if config.precision == "int8":
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise LowerError(f"{NAME}: precision 'int8' needs torchao's PT2E flow: pip install torchao ({error})") from error
    if config.compile and cxx_compiler() is None:
        raise LowerError(
            f"{NAME}: compile = true needs a C++ compiler for torch.compile's inductor and none was found "
            "(looked for $CXX, g++, c++, clang++); install one (Debian/Ubuntu: apt install g++; conda: "
            "conda install gxx_linux-64) or set compile = false for an eager (slow) lowered graph"
        )
    if config.precision == "bf16" and not cpu.native_bf16() and not config.allow_emulated_bf16:
        raise LowerError(
            f"{NAME}: precision 'bf16' needs a CPU with native bf16 arithmetic (avx512_bf16 or amx_bf16 on x86, "
            f"bf16 on Arm); this CPU ({cpu.cpu_name()}, oneDNN ISA {cpu.onednn_isa()}) has none, so bf16 would be emulated and slower "
            "than fp32. Use precision 'int8', or allow_emulated_bf16 = true for an accuracy study"
        )


# -- preparing the float graph ------------------------------------------------------------


def _strip_simulation(gm: fx.GraphModule) -> int:
    """Remove simulated activation quantizers (inserted nodes, quantized attention cores)."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.meta.get(INSERTED):
            remove_inserted(gm, node)
            removed += 1
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantizedAttentionCore):
            core = gm.get_submodule(node.target)
            gm.set_submodule(node.target, AttentionCore(core.dropout_p, core.scale, core.is_causal).eval())
            removed += 1
    gm.recompile()
    return removed


def _body(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph with positional inputs and flat outputs: what torch.export takes."""
    body = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="LoweredBody")
    body.graph.set_codegen(CodeGen())
    body.recompile()
    return body.eval()


def _bf16_linears(gm: fx.GraphModule, skip: tuple[str, ...]) -> int:
    """Linears to bf16 weights, with their input cast down and output cast back up."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or is_skipped(node.target, skip):
            continue
        module = gm.get_submodule(node.target)
        if type(module) is not torch.nn.Linear:
            continue
        module.to(torch.bfloat16)
        with gm.graph.inserting_before(node):
            down = gm.graph.call_method("to", (node.args[0], torch.bfloat16))
        node.args = (down, *node.args[1:])
        with gm.graph.inserting_after(node):
            up = gm.graph.call_method("to", (node, torch.float32))
        node.replace_all_uses_with(up, delete_user_cb=lambda user: user is not up)
        count += 1
    gm.recompile()
    return count


def _export(body: fx.GraphModule, args: tuple) -> fx.GraphModule:
    batch = torch.export.Dim("batch")
    # The sequence range is left to export, as graphprune.trace does: models differ in what they allow.
    shapes = tuple({0: batch, 1: torch.export.Dim.DYNAMIC} for _ in args)
    return torch.export.export(body, args, dynamic_shapes=shapes, strict=False).module()


def _plain(module: fx.GraphModule) -> fx.GraphModule:
    """An ordinary GraphModule of an exported one: no input guards module, train()/eval() allowed."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph.eliminate_dead_code()
    plain = fx.GraphModule(module, graph, class_name="LoweredGraph")
    return plain.eval()


# -- the pass -------------------------------------------------------------------------------


@graphprune.register_pass(NAME, config=LowerConfig)
def lower(graph, config: LowerConfig, data=None):
    """Lower the graph onto real int8 (torchao PT2E) or bf16 kernels, compiled by inductor; inference only.

    Static int8 calibrates activation ranges on ``data`` (a ``CalibrationData``);
    dynamic int8 and bf16 need none. The lowered graph runs, saves and loads like
    any other, on CPUs of the ISA it was lowered for.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "lower", {"precision": "int8", "activations": "static"},
        ...                                   data=graphprune.CalibrationData(texts, tokenizer))
        >>> info["lowered_linears"]
    """
    _check_machine(config)
    isa = cpu.onednn_isa()
    scheme = _int8_scheme(config, isa) if config.precision == "int8" else None
    call = model_call_of(graph.module)
    if call is None:
        raise ValueError(f"{NAME}: the graph has no recorded model call (trace a HF model with graphprune.trace)")
    if graph.device.type != "cpu":
        raise LowerError(f"{NAME}: lowers onto CPU kernels and the graph is on {graph.device}; move it first with graph.to('cpu')")
    static_int8 = config.precision == "int8" and config.activations == "static"
    batches = []
    if static_int8:
        batches = calibration_batches(graph, data, num_samples=config.num_samples, caller=f"{NAME} (static int8)", seed=config.seed)
    started = time.perf_counter()
    if "layers" not in (graph.meta.get("common") or {}):
        # Record the architecture while its Linear nodes are still there: summary() reads it afterwards.
        graph, _ = graphprune.run_pass(graph, "add_common_metadata")
    float_bytes = _float_weight_bytes(graph.module)
    gm = graph.module
    committed = commit_masks(graph)
    stripped = _strip_simulation(gm)
    replace_empty_linears(gm)
    gm.eval()

    example = batches[0] if batches else {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    args = tuple(call.example_inputs(model_inputs(example, graph)).values())
    # Export needs at least 2 rows and 2 tokens to keep batch and sequence symbolic.
    args = tuple(a.repeat(2, 2) if a.shape[0] < 2 or a.shape[1] < 2 else a for a in args)
    quantized_linears = _bf16_linears(gm, config.skip) if config.precision == "bf16" else 0
    with torch.no_grad():
        exported = _export(_body(gm), args)

    if config.precision == "int8":
        exported, quantized_linears = _quantize_int8(exported, config, scheme, batches, call, graph, args)
    lowered = _plain(exported)
    install_model_call(lowered, call, call.out_spec)

    graph.module = lowered
    for node in lowered.graph.nodes:
        for k in our_keys(node):
            del node.meta[k]
    weight_bytes = _weight_bytes(lowered)
    info = {
        "precision": config.precision,
        "activations": config.activations if config.precision == "int8" else None,
        "scheme": scheme,
        "isa": isa,
        "cpu": cpu.cpu_name(),
        "lowered_linears": quantized_linears,
        "calibration_samples": sum(len(b["input_ids"]) for b in batches),
        "weight_bytes": weight_bytes,
        "float_weight_bytes": float_bytes,
        "folded_masks": len(committed),
        "removed_simulated_quantizers": stripped,
        "compiled": config.compile,
        "seconds": round(time.perf_counter() - started, 2),
    }
    graph.meta["lowered"] = {k: v for k, v in info.items() if k != "seconds"}
    graph.meta[RUNTIME] = {"compile": config.compile, "freezing": True, "inference_only": True}
    graph.meta.pop("quantize", None)  # the simulated formats are gone
    apply_runtime(graph)
    return graph, info


def _int8_scheme(config: LowerConfig, isa: str | None) -> str:
    """The configured scheme, or for "auto" the one whose kernels are exact at this ISA (see graphprune.ir.cpu)."""
    if config.scheme == "auto":
        return cpu.int8_scheme(isa)
    if not cpu.exact_at(config.scheme, isa):
        warnings.warn(
            f"{NAME}: scheme {config.scheme!r} on this CPU (oneDNN ISA {isa}, no VNNI or AMX): its int8 kernels add "
            "u8 x s8 products in pairs into int16, which 8-bit activations times 8-bit weights saturate, so the "
            "compiled graph will not compute what its reference arithmetic says. Keep it only for a graph you will "
            f"load on a VNNI/AMX CPU; scheme 'auto' picks {cpu.int8_scheme(isa)!r} here",
            stacklevel=3,
        )
    return config.scheme


def _quantize_int8(exported: fx.GraphModule, config: LowerConfig, scheme: str, batches, call, graph, example_args: tuple):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(_scheme_config(x86, scheme, dynamic=config.activations == "dynamic"))
    for name in _skipped_modules(exported, config.skip):
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"{NAME}: calibrating int8 scales", unit="batch", leave=False):
            prepared(*call.example_inputs(model_inputs(batch, graph)).values())
        if not batches:  # dynamic scales: one call sets up the weight observers
            prepared(*example_args)
    converted = convert_pt2e(prepared)
    count = sum(1 for n in converted.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                and _is_dequantized(n.args[1]))
    return converted, count


def _scheme_config(x86, scheme: str, *, dynamic: bool):
    """torchao's x86 inductor config with the scheme's activation and weight ranges."""
    activations, weights = cpu.SCHEMES[scheme]["activations"], cpu.SCHEMES[scheme]["weights"]
    default = x86.get_default_x86_inductor_quantization_config(is_dynamic=dynamic, reduce_range=activations[1] == 127)
    weight = dataclasses.replace(default.weight, quant_min=weights[0], quant_max=weights[1])
    return dataclasses.replace(default, weight=weight)


def _skipped_modules(exported: fx.GraphModule, prefixes: tuple[str, ...]) -> list[str]:
    """The Linear modules (by their path in the exported graph's module stack) to keep in float."""
    names = set()
    for node in exported.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                if is_skipped(path, prefixes):
                    names.add(path)
    return sorted(names)


def _is_dequantized(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "dequantize" in str(node.target)


def _float_weight_bytes(gm: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))


def _weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every tensor the lowered graph holds (int8 weights count one byte each)."""
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
