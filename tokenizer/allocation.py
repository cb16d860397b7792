"""Choosing how many tokens each image gets, other than by the policy itself.

* :func:`binary_search_lengths`: the paper's heuristic baseline ("NTM + binary search", Table 2):
  the smallest length on a grid whose reconstruction error is at most a threshold, found by
  decoding at each probe. Vectorised over the batch: every probe is one decoder call for all images.
* :func:`oracle_lengths`: decode at every length and keep the one with the best reward (the upper
  bound of any allocation; for evaluation only).

Both take an ``error_fn(lengths [B]) -> rl [B]`` so they work for any model (and for synthetic
curves in tests); they never see the model itself.
"""

from __future__ import annotations

from typing import Callable

import torch

ErrorFn = Callable[[torch.Tensor], torch.Tensor]


def binary_search_lengths(error_fn: ErrorFn, grid: torch.Tensor, threshold: float, batch_size: int) -> torch.Tensor:
    """Smallest ``grid`` length whose error is ``<= threshold`` per sample (the largest if none passes).

    Assumes the error is non-increasing in length (what Nested Tail Masking trains for). Costs
    ``ceil(log2(K))`` calls of ``error_fn`` for a grid of K lengths.
    """
    grid = grid.to(torch.long)
    device = grid.device
    lo = torch.zeros(batch_size, dtype=torch.long, device=device)
    hi = torch.full((batch_size,), grid.numel() - 1, dtype=torch.long, device=device)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        passed = error_fn(grid[mid]).to(device) <= threshold
        active = lo < hi
        hi = torch.where(active & passed, mid, hi)
        lo = torch.where(active & ~passed, mid + 1, lo)
    return grid[lo]


def oracle_lengths(error_fn: ErrorFn, grid: torch.Tensor, reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode at every grid length and keep the best ``reward_fn(rl, length)`` per sample.

    Returns ``(lengths [B], errors [B, K])``: the full error curves come for free and are worth keeping.
    """
    errors = torch.stack([error_fn(torch.full((batch_size,), int(length), dtype=torch.long, device=grid.device))
                          for length in grid.tolist()], dim=1)                    # [B, K]
    rewards = reward_fn(errors, grid[None, :].to(errors.dtype).expand_as(errors))  # [B, K]
    return grid[rewards.argmax(dim=1)], errors
