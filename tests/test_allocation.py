"""The search and oracle baselines on synthetic error curves whose answers are known."""

import torch

from adatok_vlm.tokenizer.allocation import binary_search_lengths, oracle_lengths
from adatok_vlm.tokenizer.rewards import continuous_reward


def curves(batch: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """Convex decreasing rl(L) per sample: a * exp(-L / s) + floor, [B, max_len] for L = 1..max_len."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, 1, generator=g) * 0.2 + 0.02
    s = torch.rand(batch, 1, generator=g) * 20 + 2
    floor = torch.rand(batch, 1, generator=g) * 0.01
    lengths = torch.arange(1, max_len + 1, dtype=torch.float)[None, :]
    return a * torch.exp(-lengths / s) + floor


def test_binary_search_returns_the_smallest_passing_length():
    table = curves(200, 64)
    grid = torch.arange(1, 65)
    calls = {"n": 0}

    def error_fn(lengths):
        calls["n"] += 1
        return table[torch.arange(200), lengths - 1]

    threshold = 0.02
    found = binary_search_lengths(error_fn, grid, threshold, 200)
    passing = table <= threshold
    expected = torch.where(passing.any(1), passing.float().argmax(1) + 1, torch.tensor(64))
    assert torch.equal(found, expected)
    assert calls["n"] == 6, "log2(64) decoder calls for the whole batch"


def test_binary_search_on_a_coarse_grid():
    table = curves(50, 32, seed=1)
    grid = torch.tensor([1, 4, 8, 16, 24, 32])
    found = binary_search_lengths(lambda lens: table[torch.arange(50), lens - 1], grid, 0.03, 50)
    for b in range(50):
        ok = [int(l) for l in grid if table[b, l - 1] <= 0.03]
        assert int(found[b]) == (ok[0] if ok else 32)


def test_oracle_picks_the_best_reward_per_sample():
    table = curves(40, 16, seed=2)
    grid = torch.arange(1, 17)
    reward = lambda rl, length: continuous_reward(rl, length, 16)  # noqa: E731
    lengths, errors = oracle_lengths(lambda lens: table[torch.arange(40), lens - 1], grid, reward, 40)
    torch.testing.assert_close(errors, table)
    full = reward(table, grid[None, :].float().expand_as(table))
    assert torch.equal(lengths, full.argmax(1) + 1)
