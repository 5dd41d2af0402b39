"""Least-squares reconstruction against torch.linalg.lstsq on the explicit problem."""

import torch

from graphprune.training.reconstruction import cross_moments, least_squares_scales, least_squares_weight, second_moments


def problem(seed=0, tokens=400, dense_in=12, out=5):
    g = torch.Generator().manual_seed(seed)
    x_d = torch.randn(tokens, dense_in, generator=g, dtype=torch.float64)
    x_p = x_d + 0.3 * torch.randn(tokens, dense_in, generator=g, dtype=torch.float64)  # inputs drifted by earlier pruning
    w_d = torch.randn(out, dense_in, generator=g, dtype=torch.float64)
    return x_d, x_p, w_d


def test_weight_equals_lstsq_on_kept_columns():
    x_d, x_p, w_d = problem()
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    rows_p, rows_d = [x_p[:200, kept], x_p[200:, kept]], [x_d[:200], x_d[200:]]  # two batches
    square, tokens = second_moments(rows_p)
    assert tokens == 400
    solved = least_squares_weight(w_d, square, cross_moments(rows_d, rows_p), dampening=0.0)
    expected = torch.linalg.lstsq(x_p[:, kept], x_d @ w_d.T).solution.T
    torch.testing.assert_close(solved, expected, rtol=1e-8, atol=1e-8)


def test_group_scales_equal_lstsq_on_group_contributions():
    x_d, x_p, w_d = problem(1)
    kept = torch.tensor([0, 1, 2, 6, 7, 8, 9, 10, 11])  # heads of 3 columns: 0, 2, 3 kept
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    w = w_d[:, kept] * 0.8
    square, _ = second_moments([x_p[:, kept]])
    scales = least_squares_scales(w, w_d, square, cross_moments([x_d], [x_p[:, kept]]), groups, dampening=0.0)
    # each group's contribution W_g x_g, flattened over tokens and outputs, is one regressor
    design = torch.stack([(x_p[:, kept][:, groups == g] @ w[:, groups == g].T).reshape(-1) for g in range(3)], 1)
    expected = torch.linalg.lstsq(design, (x_d @ w_d.T).reshape(-1, 1)).solution.squeeze(1)
    torch.testing.assert_close(scales, expected, rtol=1e-8, atol=1e-8)
