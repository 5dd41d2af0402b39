"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with an OBS weight update.

For a Linear layer with calibration inputs X (one row per real token), the pruned
weights are chosen and the remaining ones updated to keep ``X W^T`` close to the
dense output: ``H = 2 X^T X / n``; dead inputs (H_jj = 0) get H_jj = 1 and zero
weight; dampening ``H += d * mean(diag H) * I``; ``U`` = the upper Cholesky factor
of ``H^-1``. Columns are swept in blocks: in each block the weights with the lowest
``w^2 / U_jj^2`` are masked (for N:M, the N lowest of every M columns of a row),
and each column's error ``(w - q) / U_jj`` is spread over the columns after it,
lazily across blocks.
"""

from __future__ import annotations

import torch

from .selection import prune_lowest


def hessian(square_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """``2 X^T X / n`` from the accumulated ``X^T X`` over ``n`` tokens."""
    return 2.0 * square_sum / max(tokens, 1)


def sparsegpt_prune(
    weight: torch.Tensor,
    h: torch.Tensor,
    *,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (rows, cols) with Hessian ``h`` (cols, cols); returns ``(new_weight, keep_mask)``.

    ``keep`` marks weights already kept (False = already pruned): those stay pruned
    and count towards the target. With ``n_m = (n, m)`` every group of m columns in a
    row loses at least n weights; otherwise exactly ``round(sparsity * numel)``
    weights (or the already-pruned count, if larger) are pruned.
    """
    w = weight.detach().to(torch.float64).clone()
    h = h.detach().to(torch.float64).clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if keep is not None:
        w[~keep] = 0.0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    pruned_mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    already = 0 if keep is None else keep.numel() - int(torch.count_nonzero(keep))
    target = max(round(sparsity * rows * cols), already)
    pruned_so_far = 0
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[start:end, start:end]
        diag = torch.diag(u1)
        forced = None if keep is None else ~keep[:, start:end]
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if n_m is None and target:
            score = w1**2 / diag.unsqueeze(0) ** 2
            if forced is not None:
                score[forced] = -1.0
            # cumulative rounding: each block takes its share so the total is exact
            block_count = round(target * end / cols) - pruned_so_far
            if forced is not None:
                block_count = max(block_count, int(torch.count_nonzero(forced)))
            mask1 = ~prune_lowest(score, block_count)
            pruned_so_far += int(torch.count_nonzero(mask1))
        for i in range(end - start):
            col = w1[:, i]
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                score = w1[:, i : i + m] ** 2 / diag[i : i + m].unsqueeze(0) ** 2
                if forced is not None:
                    score[forced[:, i : i + m]] = -1.0
                lowest = torch.topk(score, n, dim=1, largest=False).indices
                mask1.scatter_(1, i + lowest, True)
                if forced is not None:
                    mask1[:, i : i + m] |= forced[:, i : i + m]
            q = col.clone()
            q[mask1[:, i]] = 0.0
            q1[:, i] = q
            err = (col - q) / diag[i]
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        pruned_mask[:, start:end] = mask1
        w[:, end:] -= err1 @ u[start:end, end:]
    return w.to(weight.dtype), ~pruned_mask
