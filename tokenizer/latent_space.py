"""Latent spaces AdaTok tokenizes in.

The paper tokenizes in a frozen VA-VAE latent space (Sec. 4.1: "a well-structured VAE latent space
... rather than the pixel space"). Small images on a CPU are better served by pixels. Both sit
behind one interface:

    latents = space.encode(pixels)   # pixels [B, 3, H, W] in [0, 1] -> [B, C, h, w]
    pixels  = space.decode(latents)  # [B, C, h, w] -> [B, 3, H, W], roughly in [0, 1] (not clamped)

Nothing here downloads: a VAE loads from a local folder or the local Hugging Face cache only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class PixelLatentSpace(nn.Module):
    """Identity latent space on pixels rescaled from [0, 1] to [-1, 1] (zero-centred targets)."""

    def __init__(self, num_channels: int = 3):
        super().__init__()
        self.num_channels = num_channels
        self.downsample = 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents + 1.0) * 0.5


class VAELatentSpace(nn.Module):
    """A frozen ``diffusers.AutoencoderKL`` with latent normalisation ``(z - shift) * scale``.

    The architecture is built from ``vae_config`` (so the tokenizer can be built, counted and
    loaded with ``from_pretrained`` without the original VAE files: its weights are part of an
    AdaTok checkpoint). The VAE's own weights are read from ``vae_path`` the first time the space is
    used, unless they came with a checkpoint. ``random_init=True`` declares the randomly initialised
    VAE intended (tests); otherwise using the space without weights is an error naming ``vae_path``. The VAE never trains: its parameters have ``requires_grad=False`` and it stays in eval
    mode whatever ``train()`` is called with.
    """

    def __init__(self, vae_config: dict, vae_path: str | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 random_init: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL

        arch = {k: v for k, v in vae_config.items() if not k.startswith("_")}
        self.vae = AutoencoderKL(**arch)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.vae_path = vae_path
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else arch.get("scaling_factor", 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else (arch.get("shift_factor") or 0.0))
        self.downsample = 2 ** (len(arch["block_out_channels"]) - 1)
        self.num_channels = int(arch["latent_channels"])
        # Saved with the checkpoint: once weights are in, a reloaded model never looks for vae_path.
        self.register_buffer("weights_loaded", torch.tensor(bool(random_init)))

    def train(self, mode: bool = True) -> "VAELatentSpace":
        super().train(mode)
        self.vae.eval()
        return self

    def load_vae_weights(self) -> None:
        """Read the frozen VAE's weights from ``vae_path`` (a folder or a repo id in the local HF cache)."""
        from diffusers import AutoencoderKL

        path = self.vae_path
        if path is None:
            raise FileNotFoundError(
                "this AdaTok uses a VAE latent space but has no VAE weights: set AdaTokConfig.vae_path to a local "
                "diffusers AutoencoderKL folder (or a repo id already in the local Hugging Face cache), e.g. "
                "`--model.vae_path /data/vavae-f16d32-diffusers`; vae_random_init=True is for tests only"
            )
        local = Path(os.path.expanduser(path))
        try:
            pretrained = AutoencoderKL.from_pretrained(str(local) if local.exists() else path, local_files_only=True)
        except (OSError, EnvironmentError, ValueError) as err:
            raise FileNotFoundError(
                f"AdaTok needs the VAE weights at vae_path={path!r}: put a diffusers AutoencoderKL folder "
                "(config.json + diffusion_pytorch_model.safetensors) there, or download the repo into the "
                "local Hugging Face cache beforehand (`hf download <repo>`); nothing is downloaded at run time. "
                f"Original error: {err}"
            ) from err
        missing, unexpected = self.vae.load_state_dict(pretrained.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the VAE at vae_path={path!r} does not match AdaTokConfig.vae_config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; pass that VAE's config as vae_config"
            )
        self.weights_loaded.fill_(True)

    def _ensure_weights(self) -> None:
        if not bool(self.weights_loaded):
            self.load_vae_weights()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._ensure_weights()
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((pixels * 2.0 - 1.0).to(dtype)).latent_dist
        return ((posterior.mean - self.shift_factor) * self.scaling_factor).to(pixels.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Not under no_grad: perceptual and adversarial losses back-propagate through the frozen decoder.
        self._ensure_weights()
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(dtype) / self.scaling_factor + self.shift_factor
        return ((self.vae.decode(z).sample + 1.0) * 0.5).to(latents.dtype)


def build_latent_space(latent_space: str, num_channels: int = 3, vae_config: dict | None = None,
                       vae_path: str | None = None, scaling_factor: float | None = None,
                       shift_factor: float | None = None, vae_random_init: bool = False) -> nn.Module:
    if latent_space == "pixel":
        return PixelLatentSpace(num_channels)
    if latent_space == "vae":
        if vae_config is None:
            raise ValueError("latent_space='vae' needs vae_config (an AutoencoderKL config dict)")
        return VAELatentSpace(vae_config, vae_path, scaling_factor, shift_factor, vae_random_init)
    raise ValueError(f"latent_space must be 'pixel' or 'vae', got {latent_space!r}")
