"""Per-class empirical token-length distributions, for generating variable-length sequences.

A DiT over AdaTok tokens must know how many tokens to generate before it starts: the count ``L`` is
a condition of the model, not something it emits. At generation time ``L`` is drawn from the
empirical distribution of the lengths the policy (ATA, paper Sec. 4.2) chose for training images of
the same class, ``p(L | y)``. The histograms are plain nested lists so they live in the DiT config.
"""

from __future__ import annotations

import torch

from ..tokenizer.validation import _describe, check_lengths
from .configuration_dit import validate_histograms


def check_class_labels(class_labels, num_classes: int, allow_null: bool = False,
                       name: str = "class_labels") -> torch.Tensor:
    """``class_labels`` must be an integer tensor ``[B]`` (B >= 1) with ids in ``0..num_classes - 1``.

    ``allow_null`` also accepts ``num_classes``, the null (unconditional) class. A list/tuple of ints
    is accepted and converted.
    """
    if isinstance(class_labels, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in class_labels):
        class_labels = torch.tensor(class_labels, dtype=torch.long)
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor [B] of class ids, got {_describe(class_labels)}")
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {class_labels.dtype}")
    if class_labels.dim() != 1 or class_labels.numel() == 0:
        raise ValueError(f"{name} must have shape [B] with B >= 1, got {tuple(class_labels.shape)}")
    top = num_classes if allow_null else num_classes - 1
    lo, hi = int(class_labels.min()), int(class_labels.max())
    if lo < 0 or hi > top:
        extra = f" ({num_classes} = the null class)" if allow_null else ""
        raise ValueError(f"{name} must lie in 0..{top}{extra}, got values in [{lo}, {hi}]")
    return class_labels.long()


class LengthSampler:
    """Samples token counts ``L in 1..m`` from per-class histograms ``[C, m]`` (entry ``L - 1``).

    A class whose row is empty (no training image of that class) and the null class ``C`` sample
    from the pooled histogram of all classes.

    Example::

        sampler = LengthSampler.from_lengths(train_lengths, train_labels, num_classes=1000, max_tokens=256)
        config.length_histograms = sampler.to_list()
        lengths = sampler.sample(torch.tensor([3, 3, 207]), generator=g)    # LongTensor [3]
    """

    def __init__(self, histograms):
        if isinstance(histograms, torch.Tensor):
            if histograms.dim() != 2:
                raise ValueError(f"histograms must have shape [num_classes, max_tokens], got {tuple(histograms.shape)}")
            histograms = histograms.tolist()
        if not isinstance(histograms, (list, tuple)) or not histograms or not isinstance(histograms[0], (list, tuple)):
            raise TypeError(f"histograms must be a [num_classes, max_tokens] tensor or nested list of counts, "
                            f"got {_describe(histograms)}")
        validate_histograms(histograms, len(histograms), len(histograms[0]), name="histograms")
        self.counts = torch.tensor(histograms, dtype=torch.float64)      # [C, m]
        pooled = self.counts.sum(0, keepdim=True)                          # [1, m]
        rows = torch.cat([self.counts, pooled])                            # [C + 1, m]; row C = null class
        empty = rows.sum(1) == 0
        rows[empty] = pooled.expand(int(empty.sum()), -1)
        self.probs = rows / rows.sum(1, keepdim=True)                     # [C + 1, m]
        cdf = rows.cumsum(1)
        self.cdf = cdf / cdf[:, -1:]
        self.empty_classes = empty[:-1].nonzero().flatten().tolist()

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def max_tokens(self) -> int:
        return self.counts.shape[1]

    def sample(self, class_labels, generator: torch.Generator | None = None) -> torch.LongTensor:
        """Draw one length per label: ``LongTensor [B]`` in ``1..m`` on the labels' device.

        ``class_labels`` may hold the null class ``num_classes`` (pooled histogram). The draw is an
        inverse-CDF lookup of uniforms from ``generator`` (any device), so a seed gives the same
        lengths on every device.
        """
        labels = check_class_labels(class_labels, self.num_classes, allow_null=True)
        where = generator.device if generator is not None else labels.device
        u = torch.rand(labels.shape[0], generator=generator, device=where).cpu().double()
        # First bin whose CDF exceeds u: never a zero-probability bin; the last CDF entry is exactly 1.
        cdf = self.cdf[labels.cpu()]                                       # [B, m]
        draws = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_max(self.max_tokens - 1)
        return (draws + 1).to(labels.device)

    def mean_lengths(self) -> torch.Tensor:
        """Expected length per class ``[C]`` (float64)."""
        return (self.probs[:-1] * torch.arange(1, self.max_tokens + 1, dtype=torch.float64)).sum(1)

    def to_list(self) -> list[list[int | float]]:
        """The counts as nested lists (ints where integral), for ``AdaTokDiTConfig.length_histograms``."""
        return [[int(v) if float(v).is_integer() else float(v) for v in row] for row in self.counts.tolist()]

    @classmethod
    def from_lengths(cls, lengths, labels, num_classes: int, max_tokens: int) -> "LengthSampler":
        """Histogram ``lengths [N]`` (1-based token counts) by ``labels [N]`` into ``[num_classes, max_tokens]``."""
        if isinstance(lengths, (list, tuple)):
            lengths = torch.tensor(lengths, dtype=torch.long)
        if isinstance(labels, (list, tuple)):
            labels = torch.tensor(labels, dtype=torch.long)
        n = lengths.shape[0] if isinstance(lengths, torch.Tensor) and lengths.dim() == 1 else -1
        lengths = check_lengths(lengths, max(n, 0), max_tokens, name="lengths")
        labels = check_class_labels(labels, num_classes, name="labels")
        if labels.shape != lengths.shape:
            raise ValueError(f"labels must have the shape of lengths {tuple(lengths.shape)}, got {tuple(labels.shape)}")
        flat = labels.cpu() * max_tokens + (lengths.cpu() - 1)
        counts = torch.bincount(flat, minlength=num_classes * max_tokens).view(num_classes, max_tokens)
        return cls(counts)

    @classmethod
    def from_config(cls, config) -> "LengthSampler":
        """The sampler stored in an ``AdaTokDiTConfig`` (an error if it holds none)."""
        if config.length_histograms is None:
            raise ValueError("this AdaTokDiT config has no length_histograms; pass num_tokens (an int or a "
                             "LongTensor [B]) or store histograms with model.set_length_histograms("
                             "LengthSampler.from_lengths(lengths, labels, num_classes, max_tokens))")
        return cls(config.length_histograms)

    def __repr__(self) -> str:
        return f"LengthSampler(num_classes={self.num_classes}, max_tokens={self.max_tokens})"
