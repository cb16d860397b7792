"""Batching variable-length token sequences: a padding collator and a length-grouped batch sampler.

AdaTok's policy gives every image its own token count, so a random batch mixes 20-token and
250-token sequences and, padded to its longest member, wastes most of its slots. Two pieces keep the
waste small:

* :class:`VarLenCollator` pads a batch of cached tokens to its own longest length (optionally
  rounded up to a multiple of 8 or to the next of a few fixed buckets, which keeps the number of
  distinct shapes small for compiled kernels), and returns the batch convention of the project,
  ``tokens [B, L, D]`` + ``lengths [B]`` (+ ``labels [B]``).
* :class:`LengthGroupedBatchSampler` shuffles, cuts the permutation into mega-batches, sorts each
  mega-batch by length and slices it into batches of similar lengths, then shuffles the batch order
  (the idea of Hugging Face's ``LengthGroupedSampler``). Deterministic from ``seed + epoch``; sharded
  across ranks so that every rank sees the same number of batches, with similar lengths in lock-step
  (ZeRO-3 gathers parameters collectively: a rank with fewer batches would hang the others).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import Sampler


# ============================================================================================
# collator
# ============================================================================================
class VarLenCollator:
    """Collate ``{"tokens": [L_i, D], "length": int, "label": int}`` items into a padded batch.

    Args:
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor cores).
        buckets: pad to the smallest of these lengths that holds the batch (exclusive with
            ``pad_to_multiple_of``); a longer batch is an error.
        max_length: never pad past this (the model's ``max_tokens``), whatever the rounding says.

    ``tokens`` may hold more rows than ``length`` (e.g. all ``m`` tokens cached); only the first
    ``length`` are used and the rest of the batch is zero. ``length`` defaults to ``tokens.shape[0]``.
    Returns ``{"tokens": [B, Lb, D], "lengths": LongTensor [B], "labels": LongTensor [B]}``
    (``labels`` only if the items carry ``label``).
    """

    def __init__(self, pad_to_multiple_of: int | None = None, buckets: Sequence[int] | None = None,
                 max_length: int | None = None):
        if pad_to_multiple_of is not None and buckets is not None:
            raise ValueError("pass either pad_to_multiple_of or buckets, not both")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if buckets is not None:
            buckets = sorted(int(v) for v in buckets)
            if not buckets or buckets[0] < 1:
                raise ValueError(f"buckets must be a non-empty list of positive lengths, got {buckets!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.pad_to_multiple_of, self.buckets, self.max_length = pad_to_multiple_of, buckets, max_length

    def padded_length(self, longest: int) -> int:
        """The batch length for a batch whose longest sequence has ``longest`` tokens."""
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_length={self.max_length}")
        size = longest
        if self.pad_to_multiple_of is not None:
            size = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        elif self.buckets is not None:
            fitting = [b for b in self.buckets if b >= longest]
            if not fitting:
                raise ValueError(f"a sequence of {longest} tokens is longer than the largest bucket {self.buckets[-1]}")
            size = fitting[0]
        return min(size, self.max_length) if self.max_length is not None else size

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        tokens, lengths, labels = [], [], []
        for i, item in enumerate(items):
            t = item["tokens"] if isinstance(item, dict) and "tokens" in item else None
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise TypeError(f"item {i}: 'tokens' must be a float tensor [L, D], got "
                                f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
            length = int(item.get("length", t.shape[0]))
            if not 1 <= length <= t.shape[0]:
                raise ValueError(f"item {i}: length must lie in 1..{t.shape[0]} (the rows of its tokens), got {length}")
            if tokens and t.shape[1] != tokens[0].shape[1]:
                raise ValueError(f"item {i}: tokens have {t.shape[1]} channels, item 0 has {tokens[0].shape[1]}")
            tokens.append(t[:length])
            lengths.append(length)
            if "label" in item:
                labels.append(int(item["label"]))
        if labels and len(labels) != len(items):
            raise ValueError("either every item or none must carry a 'label'")
        size = self.padded_length(max(lengths))
        out = tokens[0].new_zeros(len(items), size, tokens[0].shape[1])
        for i, t in enumerate(tokens):
            out[i, : t.shape[0]] = t
        batch = {"tokens": out, "lengths": torch.tensor(lengths, dtype=torch.long)}
        if labels:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


# ============================================================================================
# length-grouped batch sampler
# ============================================================================================
class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of indices, grouped by similar length.

    Per epoch (seeded by ``seed + epoch``, identical on every rank):

    1. permute all indices (``shuffle``); ``drop_last`` drops the remainder that cannot fill a
       global batch of ``batch_size * world_size``; otherwise the permutation is padded by repeating
       its start (like ``DistributedSampler``) to a multiple of ``world_size``;
    2. cut it into mega-batches of ``mega_batch_mult`` global batches and sort each by length
       (longest first);
    3. slice each mega-batch into global batches; rank ``r`` takes items ``r, r + W, ...`` of each,
       so all ranks get equally many batches with nearly equal lengths;
    4. shuffle the order of the global batches, keeping the one with the longest sequence first (an
       out-of-memory error shows at step 0, not hours later).

    With ``world_size=1`` and ``drop_last=False`` every index appears exactly once per epoch.
    ``set_epoch(e)`` selects the epoch; ``set_position(e, b)`` also skips the first ``b`` batches
    (resume mid-epoch).
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 mega_batch_mult: int = 50, rank: int = 0, world_size: int = 1):
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() == 0 or lengths.is_floating_point():
            raise ValueError(f"lengths must be a non-empty 1D sequence of ints, got shape {tuple(lengths.shape)} "
                             f"{lengths.dtype}")
        for name, value in (("batch_size", batch_size), ("mega_batch_mult", mega_batch_mult),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank!r}")
        self.lengths = lengths.long()
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, int(seed), shuffle, drop_last
        self.mega_batch_mult, self.rank, self.world_size = mega_batch_mult, rank, world_size
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"{lengths.numel()} items cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks with drop_last=True")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = self.lengths.numel()
        if self.drop_last:
            return n // self.global_batch_size
        return -(-n // self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = int(epoch), 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(batch)

    def global_batches(self, epoch: int) -> list[torch.Tensor]:
        """All global batches of an epoch (before sharding), in iteration order."""
        n, gbs = self.lengths.numel(), self.global_batch_size
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.drop_last:
            perm = perm[: (n // gbs) * gbs]
        elif n % self.world_size:
            pad = self.world_size - n % self.world_size
            perm = torch.cat([perm, perm.repeat(-(-pad // n))[:pad]])
        mega = gbs * self.mega_batch_mult
        batches = []
        for chunk in perm.split(mega):
            order = torch.argsort(self.lengths[chunk], descending=True, stable=True)
            batches.extend(chunk[order].split(gbs))
        if self.shuffle and len(batches) > 1:
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
            longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self):
        batches = self.global_batches(self.epoch)
        for b in range(self.start_batch, len(batches)):
            yield batches[b][self.rank :: self.world_size].tolist()
        self.start_batch = 0


def padding_fraction(batches: Iterable[Sequence[int]], lengths, pad_to_multiple_of: int | None = None) -> float:
    """Wasted slots / total slots when each batch is padded to its longest sequence.

    ``lengths[i]`` is the token count of item ``i``; ``pad_to_multiple_of`` rounds each batch up as
    :class:`VarLenCollator` would.
    """
    lengths = torch.as_tensor(lengths).long()
    total = valid = 0
    for batch in batches:
        ls = lengths[torch.as_tensor(list(batch), dtype=torch.long)]
        if ls.numel() == 0:
            continue
        size = int(ls.max())
        if pad_to_multiple_of:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        total += size * ls.numel()
        valid += int(ls.sum())
    return 0.0 if total == 0 else (total - valid) / total
