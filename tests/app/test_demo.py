"""The demo's workflow on a tiny model and synthetic data (the real run is `make demo`)."""

import graphprune
from graphprune.app.demo import run_demo

from ..models import make_model, sentiment_data, tiny_tokenizer, trace_once


def test_demo_workflow_produces_the_table():
    tokenizer = tiny_tokenizer()
    graph = trace_once(make_model())
    splits = {"train": sentiment_data(64, seed=0), "validation": sentiment_data(16, seed=1), "test": sentiment_data(40, seed=2)}
    graphprune.finetune(graph, splits["train"], tokenizer, epochs=8, batch_size=16, learning_rate=3e-3, progress=False)
    lines = []
    table = run_demo(baseline=graph, tokenizer=tokenizer, splits=splits, recovery_steps=3, progress=False, log=lines.append)
    assert [row["stage"] for row in table.rows] == [
        "dense baseline", "sparsegpt 50% weights (one-shot)", "  + recovery (3 steps, KD)",
        "kprune 50% FLOPs kept (one-shot)", "  + recovery (3 steps, KD)",
    ]
    dense, pruned, recovered, structured, structured_recovered = table.rows
    assert structured["params"] < dense["params"]  # heads and neurons really removed, not masked
    assert structured_recovered["params"] == structured["params"]
    assert dense["params"] == pruned["params"] == sum(p.numel() for p in graph.module.parameters())
    encoder_weights = sum(
        graph.module.get_submodule(f"bert.encoder.layer.{i}.{name}").weight.numel()
        for i in range(2)
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
    )
    assert dense["nonzero_params"] - pruned["nonzero_params"] == encoder_weights // 2
    assert recovered["nonzero_params"] == pruned["nonzero_params"]  # the masks held during recovery
    assert dense["latency_vs_dense"] == 1.0 and recovered["latency_vs_dense"] > 0
    assert "accuracy" in lines[-1] and "nonzero_params" in lines[-1]
    assert all(not n.meta.get("graphprune.sparsity") for n in graph.nodes)  # the baseline is untouched
