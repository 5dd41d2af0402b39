"""Tutorial 2: write your own passes, run them in a TOML pipeline, save the result.

A transform pass (remove every Dropout node: they are identities at inference, as
in MASE's first tutorial) and an analysis pass (each Linear's share of the FLOPs,
written under its own metadata concern), both registered exactly like the built-in
passes. Offline, on all-MiniLM-L6-v2 and Rotten Tomatoes snippets:

    python tutorials/tutorial_2_write_a_pass.py [--quick]
"""

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import graphprune
from graphprune.training.data import load_rotten_tomatoes
from graphprune.ir.metadata import common, node_meta
from graphprune.training.models import load_minilm


@dataclass(frozen=True)
class RemoveDropoutConfig:
    """keep: module names whose Dropout stays (for example the classifier's)."""

    keep: tuple[str, ...] = ()


@graphprune.register_pass("tutorial_remove_dropout", config=RemoveDropoutConfig)
def remove_dropout(graph, config):
    """Remove Dropout nodes (identities at inference)."""
    gm = graph.module
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target not in config.keep and isinstance(gm.get_submodule(node.target), nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return graph, {"removed": removed}


@dataclass(frozen=True)
class FlopShareConfig:
    """top: how many Linears to report."""

    top: int = 5

    def __post_init__(self):
        graphprune.check_range("top", self.top, 1)


@graphprune.register_pass("tutorial_flop_share", config=FlopShareConfig, kind="analysis")
def flop_share(graph, config):
    """Write each Linear's share of the graph's FLOPs under node.meta['graphprune.flop_share']."""
    if "common" not in graph.meta or "totals" not in graph.meta["common"]:
        raise ValueError("pass 'tutorial_flop_share' needs add_common_metadata to run first")
    total = graph.meta["common"]["totals"]["flops"]
    shares = []
    for node in graph.nodes:
        if node.op == "call_module" and common(node).get("flops"):
            share = common(node)["flops"] / total
            node_meta(node, "flop_share")["share"] = share
            shares.append((share, node.target))
    return graph, {"top": sorted(shares, reverse=True)[: config.top]}


PIPELINE = """
[[passes]]
name = "tutorial_remove_dropout"
keep = ["dropout"]

[[passes]]
name = "add_common_metadata"
seq_len = 64

[[passes]]
name = "tutorial_flop_share"
top = 3
"""


def main(quick: bool) -> None:
    model, tokenizer = load_minilm(num_labels=2)
    graph = graphprune.trace(model.eval())
    print("registered passes:")
    for name, description in graphprune.list_passes().items():
        print(f"  {name:<26} {description}")

    with tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp) / "pipeline.toml"
        toml.write_text(PIPELINE)
        new, infos = graphprune.run_pipeline(graph, toml)
        print(f"\nremoved {infos[0]['removed']} Dropout nodes; largest FLOP shares:")
        for share, target in infos[2]["top"]:
            print(f"  {share:6.1%}  {target}")

        # Bad configs are refused before anything runs, and the graph is left alone.
        try:
            graphprune.run_pass(new, "tutorial_flop_share", {"top": 0})
        except ValueError as error:
            print(f"\nrefused: {error}")

        texts = load_rotten_tomatoes()["test"].texts[: 8 if quick else 128]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            diff = (new.module(**batch).logits - model(**batch).logits).abs().max().item()
        print(f"without dropout the graph still matches eager in eval mode: max diff {diff:.1e} on {len(texts)} snippets")

        new.save(Path(tmp) / "no-dropout")
        again = graphprune.load(Path(tmp) / "no-dropout")
        print(f"reloaded: {again}\n  history: {[h['pass'] for h in again.history]}")
        print(f"  a node's own concern survives the checkpoint: {again.node('classifier').meta.get('graphprune.flop_share')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer snippets (used by the tests)")
    main(parser.parse_args().quick)
