"""Turning importance scores into keep-masks: exact counts, per tensor, per row, globally, N:M.

Every function returns bool keep-masks (True = kept) and prunes exactly the number
of weights asked for, ties broken by position, so achieved sparsity equals the
request to within rounding. Weights already masked get a score of -inf: they are
pruned first and count towards the target, so pruning again at a higher sparsity
keeps every earlier pruned weight pruned.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

# Above this many values, the k-th smallest is found from a sample and a narrow window.
_FAST_SELECT = 1 << 16
_SAMPLE = 1 << 16


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) of a 1-D tensor, faster than ``kthvalue`` on large inputs.

    A seeded sample brackets the answer; only the values inside the bracket are
    ranked (Floyd and Rivest's selection). Falls back to ``kthvalue`` when the
    bracket misses, so the result is always exact.
    """
    n = values.numel()
    if n <= _FAST_SELECT:
        return values.kthvalue(k).values
    generator = torch.Generator().manual_seed(n * 31 + k)
    sample = values[torch.randint(n, (_SAMPLE,), generator=generator).to(values.device)]
    q = k / n
    margin = 6 * math.sqrt(max(q * (1 - q), 1e-6) / _SAMPLE) + 2 / _SAMPLE
    lo = sample.kthvalue(max(1, int((q - margin) * _SAMPLE))).values if q - margin > 0 else None
    hi = sample.kthvalue(min(_SAMPLE, int(math.ceil((q + margin) * _SAMPLE)))).values if q + margin < 1 else None
    # count_nonzero, not .sum(): summing a bool tensor first widens it to int64
    below = int(torch.count_nonzero(values < lo)) if lo is not None else 0
    if lo is None:
        inside = values[values <= hi]
    elif hi is None:
        inside = values[values >= lo]
    else:
        inside = values[(values >= lo) & (values <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return values.kthvalue(k).values


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape with exactly ``count`` of the lowest scores pruned."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count <= 0:
        return keep.view_as(scores)
    if count >= flat.numel():
        return (~keep).view_as(scores)
    threshold = kth_smallest(flat, count)
    keep = flat > threshold
    extra = flat.numel() - int(torch.count_nonzero(keep)) - count  # ties at the threshold pruned beyond the count
    if extra > 0:
        tied = torch.nonzero(flat == threshold).reshape(-1)
        keep[tied[-extra:]] = True  # keep the last tied ones: ties go by position
    return keep.view_as(scores)


def _masked_scores(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    scores = scores.float()
    if keep is None:
        return scores
    return torch.where(keep, scores, torch.full_like(scores, -math.inf))


def local_masks(scores: dict, sparsity: float, keeps: dict) -> dict:
    """Each tensor on its own: its lowest ``sparsity`` share pruned."""

    def one(name):
        s = _masked_scores(scores[name], keeps.get(name))
        return name, prune_lowest(s, _count(s.numel(), sparsity, keeps.get(name)))

    # Selection is mostly single-threaded work; tensors go to the cores in parallel
    # (torch releases the GIL inside its ops).
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return dict(pool.map(one, list(scores)))


def global_masks(scores: dict, sparsity: float, keeps: dict) -> dict:
    """All tensors together: the lowest ``sparsity`` share of every score pooled, by one threshold."""
    names = list(scores)
    flat = torch.cat([_masked_scores(scores[n], keeps.get(n)).reshape(-1) for n in names])
    already = sum(_masked_count(keeps[n]) for n in names if keeps.get(n) is not None)
    keep = prune_lowest(flat, max(round(sparsity * flat.numel()), already))
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = keep[start : start + size].view_as(scores[name])
        start += size
    return out


def row_masks(scores: dict, sparsity: float, keeps: dict) -> dict:
    """Within each output row (Wanda's comparison group): rows prune the same count, to within one.

    The tensor's total is exact: ``round(sparsity * numel)``, spread over the rows.
    """
    out = {}
    for name, s in scores.items():
        keep_before = keeps.get(name)
        s = _masked_scores(s, keep_before)
        rows, cols = s.shape
        base, extra = divmod(round(sparsity * s.numel()), rows)
        counts = torch.full((rows,), base, dtype=torch.long, device=s.device)
        counts[:extra] += 1
        if keep_before is not None:  # masks only grow
            counts = torch.maximum(counts, cols - keep_before.sum(dim=1))
        order = torch.argsort(s, dim=1, stable=True)
        pruned_in_order = torch.arange(cols, device=s.device).unsqueeze(0) < counts.unsqueeze(1)
        keep = torch.ones_like(s, dtype=torch.bool)
        keep.scatter_(1, order, ~pruned_in_order)
        out[name] = keep
    return out


def whole_row_masks(scores: dict, sparsity: float, keeps: dict, *, pooled: bool) -> dict:
    """Whole output rows pruned, by mean row score, per tensor or pooled over all tensors."""
    row_scores = {n: _masked_scores(s, keeps.get(n)).mean(dim=1) for n, s in scores.items()}
    if pooled:
        chosen = global_masks(row_scores, sparsity, {})
    else:
        chosen = {n: prune_lowest(r, round(sparsity * r.numel())) for n, r in row_scores.items()}
    out = {}
    for name, keep_rows in chosen.items():
        keep = keep_rows.unsqueeze(1).expand_as(scores[name]).clone()
        out[name] = keep & keeps[name] if keeps.get(name) is not None else keep
    return out


def n_m_masks(scores: dict, n: int, m: int, keeps: dict) -> dict:
    """In every group of ``m`` consecutive inputs of a row, the ``n`` lowest pruned."""
    out = {}
    for name, s in scores.items():
        rows, cols = s.shape
        if cols % m:
            raise ValueError(f"{name}: {cols} inputs do not split into groups of {m} for {n}:{m} pruning")
        grouped = _masked_scores(s, keeps.get(name)).view(rows, cols // m, m)
        order = torch.argsort(grouped, dim=2, stable=True)[:, :, :n]
        keep = torch.ones_like(grouped, dtype=torch.bool)
        keep.scatter_(2, order, False)
        keep = keep.view(rows, cols)
        out[name] = keep & keeps[name] if keeps.get(name) is not None else keep
    return out


def _count(numel: int, sparsity: float, keep: torch.Tensor | None) -> int:
    # never fewer than the weights already masked: masks only grow
    return max(round(sparsity * numel), _masked_count(keep) if keep is not None else 0)


def _masked_count(keep: torch.Tensor) -> int:
    return keep.numel() - int(torch.count_nonzero(keep))
