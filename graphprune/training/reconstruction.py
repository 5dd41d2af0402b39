"""Layer-wise least-squares reconstruction, written once for every pass that repairs a layer.

A Linear layer ``y = W x`` of a compressed graph sees inputs ``x_p`` (from the graph
as compressed so far) where the dense graph's layer saw ``x_d``. The passes here
choose new weights so that, over calibration tokens, the compressed layer's output
matches the dense one's, ``W_d x_d``. Everything needed is two sums over the tokens,
accumulated once: ``S = sum x_p x_p^T`` and ``C = sum x_d x_p^T``.

- :func:`least_squares_weight`: the full solution ``W_d C (S + lambda I)^-1``, used by
  SparseGPT's dense-input correction and K-prune's output-projection re-solve
  (restrict ``S`` and ``C`` to the kept input columns to re-solve a pruned layer);
- :func:`least_squares_scales`: one scale per group of input columns (a head or a
  neuron), Kwon et al.'s mask tuning: the best ``m`` in ``y ~ sum_g m_g W_g x_g``.

Dampening adds ``lambda = dampening * mean(diag(S))`` to the diagonal, as SparseGPT does.
"""

from __future__ import annotations

import torch


def second_moments(rows: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum x x^T, tokens)`` over per-batch row tensors, in float64."""
    square = sum(x.double().T @ x.double() for x in rows)
    return square, sum(x.shape[0] for x in rows)


def cross_moments(dense_rows: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
    """``sum x_d x_p^T`` over matching per-batch rows of the dense and the compressed graph."""
    return sum(d.double().T @ x.double() for d, x in zip(dense_rows, rows))


def _damped(square: torch.Tensor, dampening: float) -> torch.Tensor:
    scale = torch.mean(torch.diag(square)).clamp_min(1e-12)
    return square + dampening * scale * torch.eye(len(square), dtype=square.dtype, device=square.device)


def least_squares_weight(dense_weight: torch.Tensor, square: torch.Tensor, cross: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """``argmin_W sum ||W x_p - W_d x_d||^2`` (+ ridge): ``W_d C (S + lambda I)^-1``.

    ``square`` is ``S`` over the columns ``W`` keeps (k x k), ``cross`` is ``C`` with the
    dense layer's columns as rows (in x k); returns ``(out, k)`` in ``dense_weight``'s dtype.
    """
    solved = torch.linalg.solve(_damped(square, dampening), (dense_weight.double() @ cross).T).T
    return solved.to(dense_weight.dtype)


def least_squares_scales(
    weight: torch.Tensor, dense_weight: torch.Tensor, square: torch.Tensor, cross: torch.Tensor, groups: torch.Tensor, dampening: float = 0.01
) -> torch.Tensor:
    """Per group of kept columns, the scale ``m_g`` minimising ``sum ||sum_g m_g W_g x_g - W_d x_d||^2`` (+ ridge to 1).

    ``weight`` holds the kept columns (out x k), ``groups`` (k,) the group of each kept
    column, ``square`` and ``cross`` as for :func:`least_squares_weight`.
    """
    w, wd = weight.double(), dense_weight.double()
    gram_cols = square * (w.T @ w)  # <W_j x_j, W_k x_k> summed over tokens, per column pair
    rhs_cols = (cross.T * (w.T @ wd)).sum(1)  # <W_j x_j, W_d x_d> per column
    count = int(groups.max()) + 1 if len(groups) else 0
    member = torch.zeros(len(groups), count, dtype=torch.float64, device=w.device)
    member[torch.arange(len(groups), device=w.device), groups.to(w.device)] = 1.0
    gram, rhs = member.T @ gram_cols @ member, member.T @ rhs_cols
    # the ridge pulls towards 1 (the untuned mask), not towards 0
    ridge = dampening * torch.mean(torch.diag(gram)).clamp_min(1e-12) if len(gram) else 0.0
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), rhs + ridge)
