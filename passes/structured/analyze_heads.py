"""``analyze_heads``: which attention heads matter, measured three ways on calibration data.

Per head (Michel et al. 2019; Voita et al. 2019; Kovaleva et al. 2019):

- ``importance``: the head-mask gradient criterion, ``sum_x |dL(x)/dmask|`` (Michel et al.),
  divided by its layer's L2 norm as they do;
- ``accuracy_drop``: accuracy on the calibration data with all heads minus the accuracy
  with only this head masked (points of accuracy, positive = the head helps), and the
  loss increase;
- ``entropy``: the mean entropy (nats) of the head's attention distribution over the
  real query tokens; low entropy = sharp attention (to [CLS], [SEP], the next token...).

Stored in ``graph.meta["heads"]`` as layer x head lists, returned as a printable table,
and drawn as PNG heatmaps when ``plot`` names a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import graphprune
from graphprune.infra.config import check_range
from graphprune.training.calibration import calibration_batches

from .blocks import attention_blocks
from .importance import mask_gradients

NAME = "analyze_heads"


@dataclass(frozen=True)
class AnalyzeHeadsConfig:
    """Fields:
    num_samples: labelled calibration examples (default 256).
    plot: a PNG path for the heatmaps (none: no plot).
    """

    num_samples: int = 256
    plot: str | None = None

    def __post_init__(self):
        check_range("num_samples", self.num_samples, 1)


@graphprune.register_pass(NAME, config=AnalyzeHeadsConfig, kind="analysis")
def analyze_heads(graph, config: AnalyzeHeadsConfig, data=None):
    """Per head: head-mask importance, accuracy drop when masked alone, attention entropy (metadata, table, PNG).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "analyze_heads", {"plot": "heads.png"}, data=validation)
        >>> print(info["table"])
    """
    blocks = attention_blocks(graph, NAME)
    batches = calibration_batches(graph, data, num_samples=config.num_samples, caller=f"pass '{NAME}'", needs_targets=True)
    (grads,), _ = mask_gradients(graph, blocks, [], batches)
    importance = [g.abs().sum(0) for g in grads]
    importance = [(s / s.norm().clamp_min(1e-12)).tolist() for s in importance]
    base_acc, base_loss = _score(graph, batches)
    drops, losses = [], []
    for block in blocks:
        row_drop, row_loss = [], []
        for head in range(block.heads):
            acc, loss = _score(graph, batches, block, head)
            row_drop.append(round(100 * (base_acc - acc), 3))
            row_loss.append(loss - base_loss)
        drops.append(row_drop)
        losses.append(row_loss)
    entropy = _entropies(graph, blocks, batches)
    graph.meta["heads"] = {
        "importance": importance, "accuracy_drop_points": drops, "loss_increase": losses, "entropy": entropy,
        "accuracy": base_acc, "examples": sum(len(b["input_ids"]) for b in batches),
    }
    if config.plot:
        plot_heads(graph.meta["heads"], config.plot)
    return graph, {"table": heads_table(graph.meta["heads"]), "accuracy": base_acc, **({"plot": config.plot} if config.plot else {})}


@torch.no_grad()
def _score(graph, batches, block=None, head=None) -> tuple[float, float]:
    """Accuracy and mean loss over the batches, with one head's output zeroed if given."""
    gm = graph.module
    handle = None
    if block is not None:
        def zero_head(module, args, output):
            output = output.clone()
            output[:, head] = 0
            return output

        handle = gm.get_submodule(block.core.target).register_forward_hook(zero_head)
    was_training = gm.training
    gm.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for batch in batches:
            out = gm(**batch)
            logits, labels = out.logits, batch["labels"]
            correct += int((logits.argmax(-1) == labels).sum()) if logits.dim() == 2 and labels.dim() == 1 else 0
            total += len(labels)
            loss_sum += float(out.loss) * len(labels)
    finally:
        if handle is not None:
            handle.remove()
        gm.train(was_training)
    return correct / total, loss_sum / total


@torch.no_grad()
def _entropies(graph, blocks, batches) -> list[list[float]]:
    """Mean attention entropy per head over real query tokens, from the attention core's own inputs."""
    gm = graph.module
    sums = [torch.zeros(b.heads, dtype=torch.float64) for b in blocks]
    counts = [0 for _ in blocks]
    real: dict[str, torch.Tensor] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            scale = module.scale if module.scale is not None else 1.0 / math.sqrt(q.shape[-1])
            scores = (q @ k.transpose(-1, -2)).double() * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            p = torch.softmax(scores, -1)
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (batch, heads, queries)
            keep = real["mask"][:, None, :].expand_as(h)
            sums[index] += (h * keep).sum((0, 2)).cpu()
            counts[index] += int(real["mask"].sum())
        return record

    handles = [gm.get_submodule(b.core.target).register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            real["mask"] = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            gm(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [(s / max(c, 1)).tolist() for s, c in zip(sums, counts)]


def heads_table(meta: dict) -> str:
    """A layer x head table of the three measures."""
    lines = []
    for title, key, fmt in (("importance (head-mask gradient, layer-normalised)", "importance", "{:5.2f}"),
                            ("accuracy drop when masked alone (points)", "accuracy_drop_points", "{:5.1f}"),
                            ("attention entropy (nats)", "entropy", "{:5.2f}")):
        rows = meta[key]
        width = max(len(r) for r in rows)
        lines.append(title)
        lines.append("layer " + " ".join(f"{h:>5}" for h in range(width)))
        lines += [f"{layer:>5} " + " ".join(fmt.format(v) for v in row) for layer, row in enumerate(rows)]
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_heads(meta: dict, path) -> None:
    """Three heatmaps (importance, accuracy drop, entropy), layer x head, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("importance", "importance (head-mask gradient)", "viridis"),
            ("accuracy_drop_points", "accuracy drop when masked (points)", "coolwarm"),
            ("entropy", "attention entropy (nats)", "magma")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (key, title, cmap) in zip(axes, keys):
        rows = meta[key]
        width = max(len(r) for r in rows)
        grid = torch.full((len(rows), width), float("nan"))
        for i, row in enumerate(rows):
            grid[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        kwargs = {}
        if key == "accuracy_drop_points":
            bound = float(torch.nan_to_num(grid.abs(), nan=0.0).max()) or 1.0
            kwargs = {"vmin": -bound, "vmax": bound}
        image = ax.imshow(grid.numpy(), cmap=cmap, aspect="auto", **kwargs)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    os.replace(partial, path)
