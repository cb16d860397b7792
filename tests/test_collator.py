"""Padding collator and length-grouped batch sampler for variable-length token sequences."""

import pytest
import torch

from adatok_vlm.generator import LengthGroupedBatchSampler, VarLenCollator, padding_fraction

D = 4


def item(length: int, label: int = 0, rows: int | None = None, fill: float = 1.0) -> dict:
    tokens = torch.full((rows or length, D), fill)
    tokens[length:] = float("nan")            # rows past the length must never be used
    return {"tokens": tokens, "length": length, "label": label}


def skewed_lengths(n: int = 8000, m: int = 256, seed: int = 0) -> torch.Tensor:
    """Policy-like token counts: most images short, a long tail up to m."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g) * 0.7 + 3.6).round().long().clamp(1, m)


# ============================================================================================
# collator
# ============================================================================================
def test_collator_pads_to_the_batch_max_with_zeros():
    out = VarLenCollator()([item(3, 1, fill=1.0), item(7, 2, rows=12, fill=2.0), item(1, 0, fill=3.0)])
    assert out["tokens"].shape == (3, 7, D)
    assert out["lengths"].tolist() == [3, 7, 1] and out["labels"].tolist() == [1, 2, 0]
    assert out["lengths"].dtype == torch.long and out["labels"].dtype == torch.long
    valid = torch.arange(7)[None] < out["lengths"][:, None]
    assert torch.equal(out["tokens"][~valid], torch.zeros(int((~valid).sum()), D))
    assert (out["tokens"][0, :3] == 1).all() and (out["tokens"][1] == 2).all() and (out["tokens"][2, 0] == 3).all()


@pytest.mark.parametrize("kwargs, longest, expected", [
    (dict(pad_to_multiple_of=8), 9, 16),
    (dict(pad_to_multiple_of=8), 16, 16),
    (dict(buckets=[64, 16, 32]), 17, 32),
    (dict(buckets=[16, 32], max_length=20), 17, 20),
    (dict(pad_to_multiple_of=8, max_length=12), 10, 12),
])
def test_collator_rounds_the_padded_length(kwargs, longest, expected):
    out = VarLenCollator(**kwargs)([item(2), item(longest)])
    assert out["tokens"].shape == (2, expected, D)
    assert out["lengths"].tolist() == [2, longest]


def test_collator_keeps_dtype_and_optional_labels():
    items = [{"tokens": torch.ones(3, D, dtype=torch.float16)}, {"tokens": torch.ones(5, D, dtype=torch.float16)}]
    out = VarLenCollator()(items)
    assert out["tokens"].dtype == torch.float16 and out["lengths"].tolist() == [3, 5] and "labels" not in out


def test_collator_bad_input():
    with pytest.raises(ValueError, match="not both"):
        VarLenCollator(pad_to_multiple_of=8, buckets=[16])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        VarLenCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="largest bucket"):
        VarLenCollator(buckets=[4, 8])([item(9)])
    with pytest.raises(ValueError, match="max_length"):
        VarLenCollator(max_length=8)([item(9)])
    with pytest.raises(ValueError, match="length must lie in 1..3"):
        VarLenCollator()([{"tokens": torch.ones(3, D), "length": 4, "label": 0}])
    with pytest.raises(ValueError, match="channels"):
        VarLenCollator()([item(2), {"tokens": torch.ones(2, D + 1), "length": 2, "label": 0}])
    with pytest.raises(TypeError, match="tokens"):
        VarLenCollator()([{"tokens": torch.ones(3, D, dtype=torch.long), "length": 2, "label": 0}])
    with pytest.raises(ValueError, match="empty"):
        VarLenCollator()([])


# ============================================================================================
# length-grouped batch sampler
# ============================================================================================
def test_grouped_sampler_is_deterministic_and_covers_every_index_once():
    lengths = skewed_lengths(1003)
    a = LengthGroupedBatchSampler(lengths, batch_size=16, seed=5, mega_batch_mult=8)
    b = LengthGroupedBatchSampler(lengths, batch_size=16, seed=5, mega_batch_mult=8)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        batches = list(a)
        assert batches == list(b) and len(batches) == len(a) == 63
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(1003))
        assert sum(len(batch) < 16 for batch in batches) == 1
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(LengthGroupedBatchSampler(lengths, 16, seed=6, mega_batch_mult=8)) != first
    # the batch holding the longest sequence comes first (an OOM shows at step 0)
    assert int(lengths[first[0]].max()) == int(lengths.max())


def test_grouped_sampler_drop_last_and_resume():
    lengths = skewed_lengths(100)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, seed=0, drop_last=True, mega_batch_mult=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and all(len(b) == 16 for b in batches)
    assert len({i for b in batches for i in b}) == 96
    sampler.set_position(0, 4)
    assert list(sampler) == batches[4:]
    assert list(sampler) == batches          # the next pass starts from batch 0 again
    with pytest.raises(ValueError, match="cannot fill"):
        LengthGroupedBatchSampler(lengths[:10], batch_size=16, drop_last=True)


@pytest.mark.parametrize("n, drop_last", [(1000, False), (1003, False), (1003, True)])
def test_grouped_sampler_shards_in_lock_step(n, drop_last):
    lengths = skewed_lengths(n)
    world = 4
    shards = [list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, drop_last=drop_last,
                                             mega_batch_mult=4, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1                      # the same number of batches per rank
    spreads = []
    for step in range(len(shards[0])):
        assert len({len(s[step]) for s in shards}) == 1             # and equal batch sizes at each step
        longest = [int(lengths[s[step]].max()) for s in shards]
        spreads.append((max(longest) - min(longest)) / max(longest))
    # similar padded lengths on every rank at a step (only the sparse long tail differs much)
    assert sorted(spreads)[len(spreads) // 2] < 0.1
    seen = [i for s in shards for b in s for i in b]
    if drop_last:
        assert len(seen) == len(set(seen)) == (n // (8 * world)) * 8 * world
    else:
        assert set(seen) == set(range(n)) and len(seen) == -(-n // world) * world


def test_grouping_beats_random_batching_on_skewed_lengths():
    lengths = skewed_lengths(8000)
    grouped = list(LengthGroupedBatchSampler(lengths, batch_size=32, seed=0))
    perm = torch.randperm(8000, generator=torch.Generator().manual_seed(0))
    random = [perm[i : i + 32].tolist() for i in range(0, 8000, 32)]
    fixed = padding_fraction(random, lengths)
    pad_to_m = 1 - lengths.float().mean().item() / 256
    g_frac = padding_fraction(grouped, lengths)
    assert g_frac < 0.10 < 0.3 < fixed < pad_to_m, (g_frac, fixed, pad_to_m)
    assert padding_fraction(grouped, lengths, pad_to_multiple_of=8) >= g_frac
    assert padding_fraction([[0, 1]], [2, 6]) == pytest.approx(4 / 12)


def test_sampler_and_collator_in_a_dataloader():
    lengths = skewed_lengths(200, m=32)
    items = [item(int(n), label=i % 3) for i, n in enumerate(lengths)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=10, seed=0, mega_batch_mult=5)
    loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=VarLenCollator())
    seen = 0
    for batch in loader:
        assert batch["tokens"].shape[1] == int(batch["lengths"].max())
        assert torch.isfinite(batch["tokens"]).all()
        seen += batch["lengths"].shape[0]
    assert seen == 200


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler([1, 2, 3], batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedBatchSampler([1, 2, 3], batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="lengths"):
        LengthGroupedBatchSampler([1.5, 2.0], batch_size=1)
