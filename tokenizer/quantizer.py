"""Token bottlenecks: continuous tokens (AdaTok's default, no VQ) and FSQ.

AdaTok keeps tokens continuous ("our method does not need vector quantization", paper Sec. 5).
FSQ (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE made simple") is offered so tokens
can become the vocabulary of a language model: each channel is bounded and rounded to one of
``levels[c]`` values, and the tuple of levels is an integer code in ``[0, prod(levels))``.

Both take encoder features ``[B, m, F]`` and return tokens ``[B, m, D]`` plus an auxiliary loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContinuousBottleneck(nn.Module):
    """Linear projection to ``token_dim`` channels with an optional regulariser.

    ``regularizer``: ``"none"``; ``"layernorm"`` (parameter-free, keeps token scale fixed for the
    generators); ``"kl"`` (diagonal Gaussian posterior: sampled in training, its mean at inference;
    the loss returned is the mean KL to N(0, I)).
    """

    def __init__(self, in_dim: int, token_dim: int, regularizer: str = "none", noise_std: float = 0.0):
        super().__init__()
        self.token_dim = token_dim
        self.regularizer = regularizer
        self.noise_std = noise_std
        self.proj = nn.Linear(in_dim, token_dim * (2 if regularizer == "kl" else 1))

    def forward(self, features: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(features)                                    # [B, m, D] or [B, m, 2D]
        aux = features.new_zeros(())
        if self.regularizer == "kl":
            mean, logvar = h.chunk(2, dim=-1)
            logvar = logvar.clamp(-30.0, 20.0)
            # Per-token KL, summed over channels, averaged over tokens and batch.
            aux = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
            h = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        elif self.regularizer == "layernorm":
            h = F.layer_norm(h, (self.token_dim,))
        if sample and self.noise_std > 0 and self.regularizer != "kl":
            # Training-time noise bounds the information one token can carry, so a short prefix
            # cannot hold the whole image and later tokens must add detail (a coarse-to-fine order).
            h = h + torch.randn_like(h) * self.noise_std
        return h, aux


class FSQBottleneck(nn.Module):
    """Finite scalar quantisation with a straight-through estimator.

    Tokens are the quantised values normalised to [-1, 1] per channel (``D = len(levels)``);
    ``codes`` gives their integer ids (mixed radix over the levels), ``codes_to_tokens`` inverts it.
    """

    def __init__(self, in_dim: int, levels: list[int]):
        super().__init__()
        self.levels = [int(level) for level in levels]
        self.token_dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        self.proj = nn.Linear(in_dim, self.token_dim)

    # Constants are built on the fly (no buffers): they must survive meta-device init in from_pretrained.
    def _levels(self, ref: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=ref.dtype, device=ref.device)

    def _basis(self, device: torch.device) -> torch.Tensor:
        basis = [1]
        for level in self.levels[:-1]:
            basis.append(basis[-1] * level)
        return torch.tensor(basis, dtype=torch.long, device=device)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        levels = self._levels(z)
        half_l = (levels - 1) * (1.0 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, features: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._bound(self.proj(features).float())
        quantized = z + (torch.round(z) - z).detach()             # straight-through rounding
        half_width = torch.div(self._levels(z), 2, rounding_mode="floor")
        tokens = (quantized / half_width).to(features.dtype)      # [B, m, D] in [-1, 1]
        return tokens, features.new_zeros(())

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Integer ids ``[...]`` of quantised tokens ``[..., D]``."""
        half_width = torch.div(self._levels(tokens.float()), 2, rounding_mode="floor")
        digits = torch.round(tokens.float() * half_width + half_width).long()
        return (digits * self._basis(tokens.device)).sum(-1)

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Tokens ``[..., D]`` of integer ids ``[...]`` in ``[0, codebook_size)``."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        levels = torch.tensor(self.levels, device=codes.device)
        digits = torch.div(codes[..., None], self._basis(codes.device), rounding_mode="floor") % levels
        half_width = torch.div(levels, 2, rounding_mode="floor")
        return (digits - half_width).float() / half_width.float()


def build_bottleneck(kind: str, in_dim: int, token_dim: int, regularizer: str = "none",
                     fsq_levels: list[int] | None = None, noise_std: float = 0.0) -> nn.Module:
    if kind == "continuous":
        return ContinuousBottleneck(in_dim, token_dim, regularizer, noise_std)
    if kind == "fsq":
        return FSQBottleneck(in_dim, fsq_levels or [8, 8, 8, 5, 5, 5])
    raise ValueError(f"bottleneck must be 'continuous' or 'fsq', got {kind!r}")
