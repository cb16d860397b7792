"""Reconstruction metrics per token count: rMSE, PSNR and rQPR (paper Sec. 5.3).

rMSE is the per-image mean squared error on images in [0, 1]; rQPR ("reconstruction quality pass
rate") is the share of images whose rMSE is at most a threshold (0.02 in the paper).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def default_lengths(max_tokens: int) -> list[int]:
    """1, 2, 4, ..., up to and including ``max_tokens``."""
    lengths, length = [], 1
    while length < max_tokens:
        lengths.append(length)
        length *= 2
    return lengths + [max_tokens]


@torch.no_grad()
def per_image_mse(model, pixels: torch.Tensor, lengths: list[int], batch_size: int = 256,
                  progress: bool = True) -> torch.Tensor:
    """``[N, K]`` per-image pixel MSE of reconstructions from each length in ``lengths``.

    ``pixels`` is uint8 ``[N, 3, H, W]`` or float in [0, 1]. The encoder runs once per image; the
    decoder once per length.
    """
    model.eval()
    out = torch.empty(pixels.shape[0], len(lengths))
    device = model.device
    starts = range(0, pixels.shape[0], batch_size)
    for start in tqdm(starts, desc="evaluating", leave=False, disable=not progress):
        x = pixels[start : start + batch_size]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)
        enc = model.encode(x)
        for k, length in enumerate(lengths):
            lens = torch.full((x.shape[0],), length, dtype=torch.long, device=device)
            recon = model.decode(enc.tokens[:, :length], lens)
            out[start : start + x.shape[0], k] = (recon.float() - x).pow(2).flatten(1).mean(1).cpu()
    return out


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for images in [0, 1]; capped at 100 dB for a perfect reconstruction."""
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def summarize(mse: torch.Tensor, lengths: list[int], threshold: float = 0.02) -> dict[str, dict[str, float]]:
    """``{"L": {"rmse", "psnr", "rqpr"}}`` means over images for each length."""
    result = {}
    for k, length in enumerate(lengths):
        col = mse[:, k]
        result[str(length)] = {
            "rmse": float(col.mean()),
            "psnr": float(psnr_from_mse(col).mean()),
            "rqpr": float((col <= threshold).float().mean()),
        }
    return result


def is_monotone_decreasing(values: list[float], tolerance: float = 0.0) -> bool:
    return all(b <= a + tolerance for a, b in zip(values, values[1:])) and all(math.isfinite(v) for v in values)
