"""``format = "hf"``: a ``save_pretrained`` folder that stock ``AutoModelFor*.from_pretrained`` loads.

A stock config describes every layer alike: so only graphs whose structure one can
express export here. Allowed: layers removed (``num_hidden_layers``, the kept layers
renumbered in order), FFN neurons removed alike in every layer (``intermediate_size``),
committed pruning masks (zeros are just weights). Refused, with the edits named:
heads or hidden dimensions removed (transformers 5 no longer honours ``pruned_heads`` on load, and fewer
heads than the config's changes ``head_dim``), FFN widths that differ between
layers, simulated quantizers, lowered graphs. Those export with ``onnx`` or ``aoti``.

Options: pooling (headless encoders: ``"mean"`` adds ``sentence_embedding``, which
``predict.py`` computes from ``last_hidden_state``), tokenizer.
"""

from __future__ import annotations

import re
import time

import torch

from ...ir.errors import ExportError
from ...ir.exporters import register_exporter
from ...ir.graph import Graph
from ...ir.runtime import inference_only
from .artefact import label_names, staged_folder
from .module import ExportModule, float_copy, reference_outputs, sample_cases, signature
from .verify import finish_artefact

NAME = "export hf"
MODEL_FILE = "model.safetensors"
LAYER_KEY = re.compile(r"^(?P<stack>.*\.layers?)\.(?P<index>\d+)\.(?P<rest>.*)$")


def _architecture(graph: Graph) -> list[dict]:
    common = graph.meta.get("common") or {}
    if "layers" not in common:
        from ...infra.pipeline import run_pass

        graph, _ = run_pass(graph, "add_common_metadata")
        common = graph.meta["common"]
    return common["layers"]


def _blockers(graph: Graph, layers: list[dict], config) -> list[str]:
    """Why a stock config cannot describe the graph, one reason per kind of edit (empty: it can)."""
    reasons = []
    if inference_only(graph):
        reasons.append("it was lowered to int8/bf16 kernels")
    quantizers = sorted({type(m).__name__ for m in graph.module.modules() if "Quantiz" in type(m).__name__})
    if graph.meta.get("quantize") or quantizers:
        reasons.append(f"it holds simulated quantizers ({', '.join(quantizers) or 'the quantize pass'})")
    heads = config.num_attention_heads
    uneven = [f"layer {layer['index']}: {layer['heads']}" for layer in layers if layer["heads"] != heads]
    if uneven:
        reasons.append(f"heads were removed ({'; '.join(uneven)} of {heads})")
    hidden = [e for e in graph.edits if e.get("pass") == "remove_hidden"]
    if hidden:
        reasons.append(f"hidden dimensions were removed ({sum(e['removed'] for e in hidden)} of {hidden[0]['hidden_before']})")
    widths = sorted({layer["ffn_width"] for layer in layers})
    if len(widths) > 1:
        reasons.append(f"FFN widths differ between layers ({', '.join(map(str, widths))})")
    return reasons


def _renumbered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder layer indices made contiguous (0, 1, ...) in the order the kept layers run."""
    indices: dict[str, list[int]] = {}
    for key in state:
        match = LAYER_KEY.match(key)
        if match:
            indices.setdefault(match["stack"], [])
            if int(match["index"]) not in indices[match["stack"]]:
                indices[match["stack"]].append(int(match["index"]))
    order = {stack: {old: new for new, old in enumerate(sorted(found))} for stack, found in indices.items()}
    result = {}
    for key, value in state.items():
        match = LAYER_KEY.match(key)
        result[f"{match['stack']}.{order[match['stack']][int(match['index'])]}.{match['rest']}" if match else key] = value
    return result


def _stock_class_and_config(graph: Graph):
    """The graph's source model class and its config, as transformers builds them."""
    import transformers

    class_name = (graph.source.get("model_class") or "").rsplit(".", 1)[-1]
    model_class = getattr(transformers, class_name, None)
    config_json = graph.source.get("config")
    if model_class is None or not config_json:
        raise ExportError(f"{NAME}: the graph records no stock transformers model class and config (source: {class_name or 'unknown'})")
    config = transformers.CONFIG_MAPPING[config_json["model_type"]].from_dict(config_json)
    names = label_names(graph)
    if names:  # the names the graph records travel into the folder's config, as from_pretrained users read them
        config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
    return model_class, config


@register_exporter("hf")
def export_hf(graph, path, *, pooling: str | None = None, tokenizer=None, seed: int = 0) -> dict:
    """Export ``graph`` to a ``save_pretrained`` folder at ``path``; returns its manifest."""
    inputs, outputs, task = signature(graph, pooling, NAME)
    model_class, config = _stock_class_and_config(graph)
    layers = _architecture(graph)
    reasons = _blockers(graph, layers, config)
    if reasons:
        raise ExportError(
            f"{NAME}: a stock {type(config).__name__} cannot describe this graph: {'; '.join(reasons)}. "
            "Export it with format 'onnx' or 'aoti', which keep any structure"
        )
    started = time.perf_counter()
    work = float_copy(graph)
    config.num_hidden_layers = len(layers)
    if layers:
        setattr(config, "intermediate_size" if hasattr(config, "intermediate_size") else "hidden_dim", layers[0]["ffn_width"])
    model = model_class(config).eval()
    state = _renumbered({k: v.detach().clone() for k, v in work.module.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"{NAME}: the graph's weights do not fit {model_class.__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    module = ExportModule(work.module, inputs, outputs).eval()  # of the folded copy itself: no second copy
    cases = sample_cases(graph, inputs, seed=seed)
    reference = reference_outputs(module, cases)
    with staged_folder(path, NAME) as folder:
        model.save_pretrained(folder)
        manifest = finish_artefact(graph, folder, caller=NAME, reference=reference, cases=cases, exact=True, started=started,
                                   tokenizer=tokenizer, artefact="hf", model_file=MODEL_FILE, inputs=inputs, outputs=outputs,
                                   task=task, pooling=pooling, precision="fp32", hf_class=model_class.__name__)
    return manifest
