"""``hessian_sensitivity``: how sharply the task loss curves in each layer's (or Linear's) weights.

Two published measures of a weight group's sensitivity to perturbation (quantization
noise, pruning), from the Hessian block of the task loss over calibration batches
(machinery in :mod:`graphprune.training.hessian`, never forming the matrix):

- the top eigenvalue by power iteration, on each of ``subsets`` disjoint subsets of
  the calibration batches, reported as mean and standard deviation (Q-BERT, Shen et
  al. 2020, ranks layers by mean + std);
- the trace by Hutchinson's estimator over all batches (HAWQ-v2, Dong et al. 2020),
  also per parameter (the average eigenvalue); with ``joint_trace`` every group's trace
  comes from the same products with the whole Hessian (PyHessian's layer-wise trace):
  as many products as probes whatever the number of groups, which is what makes the
  traces of every Linear affordable.

Groups (config ``granularity``): ``layer`` (default) takes the weights of every Linear
of an encoder layer together; ``linear`` takes each encoder Linear's weight alone.
Weights only, as both papers do (biases and LayerNorms are kept in float anyway).

Stored, JSON-able: ``graph.meta["sensitivity"]`` = ``{"granularity", "num_samples",
"subsets", "groups": [{"name", "layer", "linears", "params", "eigenvalues",
"eigenvalue", "eigenvalue_std", "sensitivity", "iterations", "trace",
"trace_per_param"}]}`` and each Linear node's ``node.meta["graphprune.sensitivity"]``
(its group's figures). ``mixed_precision`` reads them.

Config fields:
    granularity: layer (default) | linear.
    names: a regular expression; only the encoder Linears whose node name it matches (``re.search``) are
        measured (default: all of them).
    num_samples: calibration examples with labels (default 96).
    eigenvalue: measure the top eigenvalue (default true); false leaves ``eigenvalue`` and ``sensitivity``
        None (mixed_precision then allocates by the trace only).
    subsets: disjoint subsets of the calibration batches for the eigenvalue (default 3);
        needs at least that many batches.
    iterations: at most this many power-iteration products per subset (default 20).
    tolerance: stop when the eigenvalue moves by at most this share of itself (default 1e-3).
    trace_samples: Rademacher vectors for the trace (default 8; 0 skips it).
    joint_trace: one Hessian-vector product over all groups' weights per probe gives every group's trace
        (default false: a product per group and probe, lower variance; true costs ``trace_samples`` products
        in all, the way to measure 36 Linears).
    seed: for the calibration subset and the random vectors.
    progress: a progress bar over groups (default true).

Example:
    >>> graph, info = graphprune.run_pass(graph, "hessian_sensitivity", {}, data=splits["train"])
    >>> print(info["table"])
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import graphprune
from graphprune.infra.config import ConfigError, check_choice, check_range
from graphprune.ir.masks import unmasked_weight
from graphprune.ir.metadata import key
from graphprune.training.calibration import calibration_batches
from graphprune.training.hessian import hessian_vector_product, hutchinson_block_traces, hutchinson_trace, top_eigenvalue

from .init_metadata import nodes_by_section

NAME = "hessian_sensitivity"
SENSITIVITY = key("sensitivity")  # node.meta key; graph.meta["sensitivity"] holds the groups


@dataclass(frozen=True)
class HessianSensitivityConfig:
    granularity: str = "layer"
    names: str | None = None
    num_samples: int = 96
    eigenvalue: bool = True
    subsets: int = 3
    iterations: int = 20
    tolerance: float = 1e-3
    trace_samples: int = 8
    joint_trace: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_choice("granularity", self.granularity, ("layer", "linear"))
        if self.names is not None:
            try:
                re.compile(self.names)
            except re.error as error:
                raise ConfigError("names", self.names, f"a regular expression ({error})") from None
        check_range("num_samples", self.num_samples, 1)
        check_range("subsets", self.subsets, 1)
        check_range("iterations", self.iterations, 1, 10_000)
        check_range("tolerance", self.tolerance, 0, 1, high_open=True)
        check_range("trace_samples", self.trace_samples, 0, 10_000)
        if not self.eigenvalue and not self.trace_samples:
            raise ConfigError("trace_samples", 0, "at least 1 when eigenvalue = false (else nothing is measured)")


def weight_groups(graph, granularity: str, names: str | None = None) -> list[dict]:
    """``[{"name", "layer", "linears": [node names], "params": [weight tensors]}]`` over the encoder Linears."""
    gm, groups = graph.module, {}
    for node, section in nodes_by_section(graph):
        if node.op != "call_module" or not isinstance(section, int) or (names is not None and not re.search(names, node.name)):
            continue
        module = gm.get_submodule(node.target)
        weight = unmasked_weight(module) if isinstance(module, nn.Linear) else None
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point() or weight.numel() == 0:
            continue
        group_key = section if granularity == "layer" else node.name
        group = groups.setdefault(group_key, {"name": f"layer {section}" if granularity == "layer" else node.name,
                                              "layer": section, "linears": [], "params": []})
        if all(p is not weight for p in group["params"]):  # a module called twice (ALBERT) counts once
            group["params"].append(weight)
        group["linears"].append(node.name)
    return list(groups.values())


@graphprune.register_pass(NAME, config=HessianSensitivityConfig, kind="analysis")
def hessian_sensitivity(graph, config: HessianSensitivityConfig, data=None):
    """Top Hessian eigenvalue (Q-BERT: mean and std over subsets) and Hutchinson trace (HAWQ-v2) per layer or Linear.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "hessian_sensitivity", {"granularity": "linear"}, data=splits["train"])
        >>> print(info["table"])
    """
    start = time.perf_counter()
    if data is None:
        raise ValueError(f"pass '{NAME}' needs labelled calibration data: pass data=... to run_pass (the task loss is differentiated)")
    groups = weight_groups(graph, config.granularity, config.names)
    if not groups:
        which = "" if config.names is None else f" whose node name matches names = {config.names!r}"
        raise ValueError(f"pass '{NAME}': the graph has no float encoder Linear weights{which} to differentiate (a lowered "
                         "int8 graph has none: measure sensitivity before lower)")
    batches = calibration_batches(graph, data, num_samples=config.num_samples, seed=config.seed, caller=f"pass '{NAME}'",
                                  needs_targets=True)
    if config.eigenvalue and len(batches) < config.subsets:
        raise ValueError(f"pass '{NAME}': field 'subsets' = {config.subsets} is not allowed; expected at most the "
                         f"{len(batches)} calibration batches (raise num_samples or lower the batch size)")
    batches = [{k: v.to(graph.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    subsets = [batches[i :: config.subsets] for i in range(config.subsets)]
    gm = graph.module
    generator = torch.Generator().manual_seed(config.seed)
    was_training = gm.training
    flags = {p: p.requires_grad for g in groups for p in g["params"]}
    gm.eval()
    records = []
    try:
        for p in flags:
            p.requires_grad_(True)
        joint = _joint_traces(gm, groups, batches, config, generator, graph.device) if config.joint_trace and config.trace_samples else None
        nothing_per_group = not config.eigenvalue and joint is not None  # then no bar over groups
        for index, group in enumerate(tqdm(groups, desc=NAME, unit="group", disable=not config.progress or nothing_per_group)):
            params, shapes = group["params"], [p.shape for p in group["params"]]
            eigenvalues, steps = [], []
            for subset in subsets if config.eigenvalue else ():
                value, used = top_eigenvalue(hessian_vector_product(gm, params, subset), shapes, iterations=config.iterations,
                                             tolerance=config.tolerance, generator=generator, device=graph.device)
                eigenvalues.append(value)
                steps.append(used)
            size = sum(p.numel() for p in params)
            if joint is not None:
                trace = joint[index]
            else:
                trace = (hutchinson_trace(hessian_vector_product(gm, params, batches), shapes, samples=config.trace_samples,
                                          generator=generator, device=graph.device) if config.trace_samples else None)
            mean = statistics.fmean(eigenvalues) if eigenvalues else None
            std = (statistics.pstdev(eigenvalues) if len(eigenvalues) > 1 else 0.0) if eigenvalues else None
            records.append({"name": group["name"], "layer": group["layer"], "linears": group["linears"], "params": size,
                            "eigenvalues": eigenvalues, "eigenvalue": mean, "eigenvalue_std": std,
                            "sensitivity": None if mean is None else mean + std, "iterations": steps,
                            "trace": trace, "trace_per_param": None if trace is None else trace / size})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        gm.train(was_training)
    for node in gm.graph.nodes:
        node.meta.pop(SENSITIVITY, None)
    nodes = {n.name: n for n in gm.graph.nodes}
    for record in records:
        for name in record["linears"]:
            nodes[name].meta[SENSITIVITY] = {k: record[k] for k in ("eigenvalue", "eigenvalue_std", "sensitivity", "trace", "trace_per_param")}
    graph.meta["sensitivity"] = {"granularity": config.granularity, "num_samples": sum(len(b["input_ids"]) for b in batches),
                                 "subsets": config.subsets, "groups": records}
    return graph, {"groups": len(records), "table": sensitivity_table(records), "seconds": round(time.perf_counter() - start, 2)}


def _joint_traces(gm, groups, batches, config, generator, device) -> list[float]:
    """Every group's Hutchinson trace from products with the Hessian of all the groups' weights together."""
    params = [p for g in groups for p in g["params"]]
    hvp = hessian_vector_product(gm, params, batches)
    bar = tqdm(total=config.trace_samples, desc=f"{NAME} (joint trace)", unit="probe", disable=not config.progress, leave=False)

    def counted(vector):
        out = hvp(vector)
        bar.update(1)
        return out

    try:
        return hutchinson_block_traces(counted, [p.shape for p in params], [len(g["params"]) for g in groups],
                                       samples=config.trace_samples, generator=generator, device=device)
    finally:
        bar.close()


def sensitivity_table(records: list[dict]) -> str:
    lines = [f"Hessian sensitivity ({NAME}): top eigenvalue over subsets (Q-BERT) and Hutchinson trace (HAWQ-v2)",
             f"{'group':<40} {'params':>9} {'eig mean':>10} {'eig std':>9} {'mean+std':>10} {'trace/param':>12}"]

    def number(value, width: int, digits: int) -> str:  # "-" for what was not measured
        return ("-" if value is None else f"{value:.{digits}g}").rjust(width)

    for r in records:
        lines.append(f"{r['name']:<40} {r['params']:>9} {number(r['eigenvalue'], 10, 4)} {number(r['eigenvalue_std'], 9, 3)} "
                     f"{number(r['sensitivity'], 10, 4)} {number(r['trace_per_param'], 12, 4)}")
    return "\n".join(lines)

