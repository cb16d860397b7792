"""Argument checks shared by the tokenizer and everything that hands it data.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
range or content) naming the argument, what was expected and what arrived, so a user never meets an
``IndexError`` deep inside a layer or a silently wrong result.
"""

from __future__ import annotations

import torch


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def check_pixel_values(pixel_values, image_size: int, num_channels: int = 3, name: str = "pixel_values") -> None:
    """``pixel_values`` must be a finite float tensor ``[B, C, H, W]`` in [0, 1] with B >= 1."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, {num_channels}, {image_size}, {image_size}], "
                        f"got {_describe(pixel_values)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got {pixel_values.dtype} "
                        "(convert uint8 images with AdaTokImageProcessor or x.float() / 255)")
    if pixel_values.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(pixel_values.shape)})")
    if c != num_channels:
        raise ValueError(f"{name} must have {num_channels} channels, got shape {tuple(pixel_values.shape)}")
    if (h, w) != (image_size, image_size):
        raise ValueError(f"{name} must be {image_size}x{image_size} (this model's image_size), got {h}x{w}; "
                         "resize with AdaTokImageProcessor")
    if not torch.isfinite(pixel_values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(pixel_values.min()), float(pixel_values.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(images in [-1, 1] or [0, 255] must be rescaled)")


def check_lengths(lengths, batch_size: int, max_length: int, name: str = "lengths") -> torch.Tensor:
    """``lengths`` must be an integer tensor ``[B]`` with values in ``1..max_length``."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape [{batch_size}], got {_describe(lengths)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (batch_size,):
        raise ValueError(f"{name} must have shape [{batch_size}] (one length per sample), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > max_length):
        raise ValueError(f"{name} must lie in 1..{max_length}, got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.long()


def check_tokens(tokens, token_dim: int, max_tokens: int, name: str = "tokens") -> None:
    """``tokens`` must be a float tensor ``[B, L, D]`` with 1 <= L <= max_tokens and B >= 1."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor of shape [B, L, {token_dim}], got {_describe(tokens)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions [B, L, D], got shape {tuple(tokens.shape)}")
    b, length, d = tokens.shape
    if b == 0 or length == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)})")
    if d != token_dim:
        raise ValueError(f"{name} must have {token_dim} channels (token_dim), got shape {tuple(tokens.shape)}")
    if length > max_tokens:
        raise ValueError(f"{name} holds {length} tokens, more than this model's {max_tokens} (num_latent_tokens)")


def resolve_num_tokens(num_tokens, batch_size: int, max_length: int, device: torch.device,
                       name: str = "num_tokens") -> torch.Tensor:
    """Turn ``None`` (all), an int or a per-sample integer tensor into ``lengths [B]``."""
    if num_tokens is None:
        return torch.full((batch_size,), max_length, dtype=torch.long, device=device)
    if isinstance(num_tokens, bool):
        raise TypeError(f"{name} must be an int, a LongTensor [B] or a mode string, got bool {num_tokens!r}")
    if isinstance(num_tokens, int):
        if not 1 <= num_tokens <= max_length:
            raise ValueError(f"{name} must lie in 1..{max_length}, got {num_tokens}")
        return torch.full((batch_size,), num_tokens, dtype=torch.long, device=device)
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.dim() == 0:
            return resolve_num_tokens(int(num_tokens) if not num_tokens.is_floating_point() else num_tokens.item(),
                                      batch_size, max_length, device, name)
        return check_lengths(num_tokens, batch_size, max_length, name).to(device)
    raise TypeError(f"{name} must be None, an int, a LongTensor [B] or a mode string, got {_describe(num_tokens)}")
