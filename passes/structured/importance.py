"""How much each attention head and FFN neuron matters: weight norms and mask gradients.

The gradient criteria put a mask of ones on every head's attention output and on
every FFN neuron's activation (Michel et al. 2019; Kwon et al. 2022), one mask row
per example so that one backward pass gives every example's gradient
``g[x, unit] = dL(x)/dmask[unit]``:

- ``taylor`` (Michel et al.): ``sum_x |g[x, unit]|``, the expected first-order change
  of the loss when the unit is removed;
- ``fisher`` (Kwon et al.): ``sum_x g[x, unit]^2``, the diagonal of the empirical
  Fisher information of the masks.

The masks are temporary forward hooks on the attention cores and the FFN down
projections; they are gone when the function returns.
"""

from __future__ import annotations

import torch

from graphprune.training.calibration import calibration_batches

from .blocks import AttentionBlock, FfnBlock

CRITERIA = ("l1", "taylor", "fisher")


def l1_head_scores(graph, blocks: list[AttentionBlock]) -> list[torch.Tensor]:
    """Per layer, each head's L1 norm over its q, k, v rows and output-projection columns."""
    gm, out = graph.module, []
    for block in blocks:
        total = torch.zeros(block.heads)
        for source in block.qkv:
            w = gm.get_submodule(source.target).weight.detach()
            total += _l1(w.reshape(block.heads, -1), 1)
        w = gm.get_submodule(block.out.target).weight.detach()
        total += _l1(w.reshape(w.shape[0], block.heads, block.head_size), (0, 2))
        out.append(total)
    return out


def l1_neuron_scores(graph, blocks: list[FfnBlock]) -> list[torch.Tensor]:
    """Per layer, each neuron's L1 norm over its up-projection row and down-projection column."""
    gm = graph.module
    return [_l1(gm.get_submodule(b.up.target).weight.detach(), 1) + _l1(gm.get_submodule(b.down.target).weight.detach(), 0) for b in blocks]


def _l1(w: torch.Tensor, dim) -> torch.Tensor:
    # one fused reduction: abs().sum() would first write a copy of the whole weight
    return torch.linalg.vector_norm(w.float(), ord=1, dim=dim).cpu()


def task_loss(outputs, batch) -> list[torch.Tensor]:
    """The graph's own loss as a sum over examples (it is a batch mean)."""
    loss = outputs.get("loss")
    if loss is None:
        raise ValueError("mask gradients need calibration batches with labels (the task loss)")
    return [loss * len(batch["input_ids"])]


def mask_gradients(
    graph, heads: list[AttentionBlock], ffns: list[FfnBlock], batches, losses=task_loss
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per-example mask gradients, per loss term: ``([term][layer](examples, heads)], [term][layer](examples, neurons)])``.

    ``losses(outputs, batch)`` returns scalar loss terms, each a sum over the batch's
    examples (so that per-example masks give per-example gradients); by default the
    graph's own task loss.
    """
    gm = graph.module
    current: dict[str, torch.Tensor] = {}

    def head_hook(key):
        def hook(module, args, output):
            mask = torch.ones(output.shape[0], output.shape[1], 1, 1, dtype=output.dtype, device=output.device, requires_grad=True)
            current[key] = mask
            return output * mask

        return hook

    def neuron_hook(key):
        def hook(module, args):
            x = args[0]
            mask = torch.ones(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1], dtype=x.dtype, device=x.device, requires_grad=True)
            current[key] = mask
            return (x * mask,) + tuple(args[1:])

        return hook

    handles = [gm.get_submodule(b.core.target).register_forward_hook(head_hook(f"h{i}")) for i, b in enumerate(heads)]
    handles += [gm.get_submodule(b.down.target).register_forward_pre_hook(neuron_hook(f"f{i}")) for i, b in enumerate(ffns)]
    keys = [f"h{i}" for i in range(len(heads))] + [f"f{i}" for i in range(len(ffns))]
    collected: list[list[list[torch.Tensor]]] = []  # [term][unit block][batch]
    was_training = gm.training
    gm.eval()
    try:
        for batch in batches:
            current.clear()
            terms = losses(gm(**batch), batch)
            while len(collected) < len(terms):
                collected.append([[] for _ in keys])
            for t, term in enumerate(terms):
                grads = torch.autograd.grad(term, [current[k] for k in keys], retain_graph=t < len(terms) - 1)
                for i, grad in enumerate(grads):
                    collected[t][i].append(grad.detach().flatten(1).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
        gm.train(was_training)
    joined = [[torch.cat(per_batch) for per_batch in term] for term in collected]
    return [term[: len(heads)] for term in joined], [term[len(heads) :] for term in joined]


def reduce_gradients(grads: list[torch.Tensor], criterion: str) -> list[torch.Tensor]:
    return [g.abs().sum(0) if criterion == "taylor" else g.pow(2).sum(0) for g in grads]


def unit_scores(graph, kind: str, blocks: list, criterion: str, data, num_samples: int, caller: str) -> list[torch.Tensor]:
    """Per-layer scores of ``kind`` units ("heads" or "neurons") by ``criterion`` (higher = keep)."""
    if criterion == "l1":
        return l1_head_scores(graph, blocks) if kind == "heads" else l1_neuron_scores(graph, blocks)
    batches = calibration_batches(graph, data, num_samples=num_samples, caller=f"{caller} (method {criterion!r})", needs_targets=True)
    head_grads, ffn_grads = mask_gradients(graph, blocks if kind == "heads" else [], blocks if kind == "neurons" else [], batches)
    return reduce_gradients((head_grads if kind == "heads" else ffn_grads)[0], criterion)
