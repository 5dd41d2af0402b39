"""One process of a data-parallel fine-tune, for tests/training/test_distributed.py.

Run as ``accelerate launch --multi_gpu --num_processes 2 distributed_worker.py OUT`` (or
plainly, for one process): fine-tunes a pruned tiny BERT (no dropout) for 5 steps with a
global batch of 16 and writes ``OUT/rank<R>.json`` (its losses, every tensor of the trained
graph's state dict, how many masked weights are non-zero, the number of processes) and, from
every rank, ``graph.save(OUT/graph)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.models

import graphprune  # noqa: E402
from graphprune.ir.masks import mask_of  # noqa: E402
from tests.models import TINY, sentiment_data, tiny_tokenizer  # noqa: E402

STEPS, BATCH = 5, 16


def pruned_tiny_graph():
    torch.manual_seed(0)
    config = tf.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    graph = graphprune.trace(tf.BertForSequenceClassification(config).eval())
    graph, _ = graphprune.run_pass(graph, "prune_weight", {"method": "l1", "sparsity": 0.5})
    return graph


def masked_weights(graph) -> tuple[int, int]:
    """How many weights the graph's masks zero, and how many of those are not zero in the effective weight."""
    masked = nonzero = 0
    for module in graph.module.modules():
        mask = mask_of(module)
        if mask is not None:
            masked += int((~mask.mask).sum())
            nonzero += int((module.weight[~mask.mask] != 0).sum())
    return masked, nonzero


def state_of(graph) -> dict[str, list]:
    """Every parameter and buffer of the graph (masks and latent weights included), flattened, as JSON takes them."""
    return {name: tensor.detach().flatten().tolist() for name, tensor in graph.module.state_dict().items()}


def run(out: Path, batch_size: int = BATCH) -> dict:
    graph = pruned_tiny_graph()
    result = graphprune.finetune(graph, sentiment_data(96), tiny_tokenizer(), max_steps=STEPS, batch_size=batch_size,
                                 max_length=16, learning_rate=1e-3, warmup_ratio=0.0, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    masked, nonzero = masked_weights(graph)
    report = {"losses": result.losses, "masked": masked, "masked_nonzeros": nonzero, "processes": world, "state": state_of(graph)}
    graph.save(out / "graph")
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    run(Path(sys.argv[1]))
