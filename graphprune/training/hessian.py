"""Second-order information of the task loss: Hessian-vector products, the top eigenvalue, the trace.

Everything works on a block of the Hessian: the second derivatives of the loss with
respect to a chosen group of parameters (one Linear's weight, or all of a layer's),
the other parameters held fixed, never forming the matrix:

- :func:`hessian_vector_product`: ``H v`` by double backpropagation (Pearlmutter
  1994), summed over batches with each batch weighted by its share of the examples,
  so that the loss is the mean over all of them;
- :func:`top_eigenvalue`: power iteration on ``H v`` (Q-BERT, Shen et al. 2020; the
  eigenvalue of largest magnitude, which for a trained model is the top one);
- :func:`hutchinson_trace`: ``E[v^T H v]`` over Rademacher vectors ``v`` (Hutchinson
  1989; HAWQ-v2, Dong et al. 2020);
- :func:`hutchinson_block_traces`: every diagonal block's trace from products with the
  whole Hessian, ``E[v_g^T (H v)_g] = tr(H_gg)`` because the entries of ``v`` are
  independent (PyHessian's layer-wise trace, Yao et al. 2020): one product per probe
  whatever the number of groups, at a higher variance than a product per block.

The graph runs in eval mode (no dropout), so that the products are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Vector = list[torch.Tensor]
HVP = Callable[[Vector], Vector]


def task_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    loss = module(**batch).get("loss")
    if loss is None:
        raise ValueError("the Hessian of the task loss needs batches with labels")
    return loss


def hessian_vector_product(module: nn.Module, params: Sequence[torch.Tensor], batches: Sequence[dict], loss=task_loss) -> HVP:
    """``v -> H v`` for the block of ``params`` of the Hessian of the mean loss over ``batches``."""
    total = sum(len(b["input_ids"]) for b in batches)

    def product(vector: Vector) -> Vector:
        result = [torch.zeros_like(p) for p in params]
        # the fused attention kernels have no second derivative; the math one is the same function
        with sdpa_kernel([SDPBackend.MATH]):
            for batch in batches:
                _accumulate(result, batch, vector)
        return result

    def _accumulate(result: Vector, batch: dict, vector: Vector) -> None:
        grads = torch.autograd.grad(loss(module, batch), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        share = len(batch["input_ids"]) / total
        for r, h in zip(result, torch.autograd.grad(dot, params)):
            r.add_(h.detach(), alpha=share)

    return product


def _dot(a: Vector, b: Vector) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def top_eigenvalue(hvp: HVP, shapes: Sequence[torch.Size], *, iterations: int, tolerance: float,
                   generator: torch.Generator, device=None) -> tuple[float, int]:
    """The eigenvalue of largest magnitude by power iteration, and the iterations it took.

    Stops when the estimate changes by at most ``tolerance`` of its magnitude, or after
    ``iterations`` products.
    """
    v = [torch.randn(s, generator=generator).to(device) for s in shapes]  # drawn on the CPU: the same on any device
    norm = _dot(v, v) ** 0.5
    v = [x / norm for x in v]
    value = None
    for step in range(1, iterations + 1):
        hv = hvp(v)
        new = _dot(v, hv)  # the Rayleigh quotient of a unit vector
        norm = _dot(hv, hv) ** 0.5
        if norm == 0.0:
            return 0.0, step
        v = [x / norm for x in hv]
        if value is not None and abs(new - value) <= tolerance * max(abs(new), 1e-12):
            return new, step
        value = new
    return value, iterations


def rademacher(shapes: Sequence[torch.Size], generator: torch.Generator, device=None) -> Vector:
    return [torch.randint(0, 2, s, generator=generator).float().mul_(2).sub_(1).to(device) for s in shapes]


def hutchinson_trace(hvp: HVP, shapes: Sequence[torch.Size], *, samples: int, generator: torch.Generator, device=None) -> float:
    """The trace of the block: the mean of ``v^T H v`` over ``samples`` Rademacher vectors (one block of
    :func:`hutchinson_block_traces`)."""
    return hutchinson_block_traces(hvp, shapes, [len(shapes)], samples=samples, generator=generator, device=device)[0]


def hutchinson_block_traces(hvp: HVP, shapes: Sequence[torch.Size], groups: Sequence[int], *, samples: int,
                            generator: torch.Generator, device=None) -> list[float]:
    """The trace of each diagonal block, the blocks being consecutive runs of ``groups[i]`` tensors of ``shapes``.

    ``hvp`` multiplies by the Hessian of all the tensors together; the mean of ``v_g^T (H v)_g`` over
    ``samples`` Rademacher vectors estimates ``tr(H_gg)`` for every block ``g`` at once.
    """
    if sum(groups) != len(shapes):
        raise ValueError(f"hutchinson_block_traces: the groups hold {sum(groups)} tensors but there are {len(shapes)} shapes")
    totals = [0.0] * len(groups)
    for _ in range(samples):
        v = rademacher(shapes, generator, device)
        hv = hvp(v)
        start = 0
        for g, count in enumerate(groups):
            totals[g] += _dot(v[start : start + count], hv[start : start + count])
            start += count
    return [t / samples for t in totals]
