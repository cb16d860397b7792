"""Latent spaces AdaTok tokenizes in.

The paper tokenizes in a frozen VA-VAE latent space (Sec. 4.1: "a well-structured VAE latent space
... rather than the pixel space"). Small images on a CPU are better served by pixels. Both sit
behind one interface:

    latents = space.encode(pixels)   # pixels [B, 3, H, W] in [0, 1] -> [B, C, h, w]
    pixels  = space.decode(latents)  # [B, C, h, w] -> [B, 3, H, W], roughly in [0, 1] (not clamped)

Nothing here downloads: a VAE loads from a local folder or the local Hugging Face cache only.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
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


def load_pretrained_vae(path: str | os.PathLike):
    """A ``diffusers.AutoencoderKL`` from a local folder (or a repo id already in the local HF cache).

    Never downloads. A missing or unreadable folder is a ``FileNotFoundError`` naming the path and what
    belongs there (a folder written by ``adatok convert-vae`` or ``save_pretrained``).
    """
    from diffusers import AutoencoderKL

    local = Path(os.path.expanduser(os.fspath(path)))
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.exists() else os.fspath(path), local_files_only=True)
    except (OSError, EnvironmentError, ValueError) as err:
        raise FileNotFoundError(
            f"AdaTok needs the VAE weights at vae_path={os.fspath(path)!r}: put a diffusers AutoencoderKL folder "
            "(config.json + diffusion_pytorch_model.safetensors) there (`adatok convert-vae --checkpoint FILE "
            "--arch va-vae-f16d32 --out DIR` writes one from a released checkpoint), or download the repo into "
            "the local Hugging Face cache beforehand (`hf download <repo>`); nothing is downloaded at run time. "
            f"Original error: {err}"
        ) from err


# The frozen VAE's convolutions run on channels-last (NHWC) activations by default: oneDNN's convolutions
# are faster there on CPU, and the outputs equal the NCHW ones to float rounding (latents within ~1e-5 of
# their range). benchmarks/results/throughput.md (VA-VAE f16d32 at 256x256, 1 thread on 2 shared Xeon
# cores with AMX, process CPU seconds, NCHW / NHWC): fp32 encoder 1.15x (adatok-s run) and 1.12x (-b run),
# decoder 1.10x and 1.08x; under bf16 autocast encoder 2.50x and 3.00x, decoder 0.68x and 1.23x (noisy);
# benchmarks/gpu_check.py measures a GPU. Only the activations change layout: converting the weights too
# was no faster in fp32 in a one-off comparison, and left as they are the checkpoints, the latent cache's
# fingerprints and ZeRO's flattening see ordinary tensors.
VAE_CHANNELS_LAST = True
# torch.autocast dtypes the frozen VAE may run under (None: the VAE's own dtype, the default).
VAE_AUTOCAST_DTYPES = ("bfloat16", "float16")


def check_vae_autocast(autocast) -> None:
    """``autocast`` must be None or one of :data:`VAE_AUTOCAST_DTYPES` (a dtype name)."""
    if autocast is not None and autocast not in VAE_AUTOCAST_DTYPES:
        raise ValueError(f"vae autocast must be None or one of {VAE_AUTOCAST_DTYPES}, got {autocast!r}")


def vae_context(autocast: str | None, device: torch.device):
    """``torch.autocast`` on ``device``'s type with the dtype named ``autocast``, or nothing when it is None."""
    check_vae_autocast(autocast)
    if autocast is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


def to_channels_last(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x [B, C, H, W]`` in channels-last memory order when ``channels_last`` (same values, same shape)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def vae_latents(vae: nn.Module, pixels: torch.Tensor, channels_last: bool = VAE_CHANNELS_LAST,
                autocast: str | None = None) -> torch.Tensor:
    """The un-normalised latents of ``pixels`` in [0, 1]: the posterior mean (the mode) of ``vae``, in its dtype
    (``autocast``'s under autocast), contiguous ``[B, C, h, w]``.

    The one definition of "the latent of an image" shared by :class:`VAELatentSpace`, the ``latent-stats``
    command and the latent cache, so the statistics and the cache hold exactly what the space normalises.
    ``channels_last`` runs the convolutions on NHWC activations (:data:`VAE_CHANNELS_LAST`); ``autocast``
    (``"bfloat16"`` / ``"float16"``) runs them under ``torch.autocast``.
    """
    dtype = next(vae.parameters()).dtype
    x = to_channels_last((pixels * 2.0 - 1.0).to(dtype), channels_last)
    with vae_context(autocast, pixels.device):
        return vae.encode(x).latent_dist.mode().contiguous()


def check_latent_stats(mean, std, num_channels: int, where: str = "vae_latent_mean/vae_latent_std") -> tuple[list, list]:
    """Validate per-channel latent statistics: two lists of ``num_channels`` finite floats, every std > 0."""
    if (mean is None) != (std is None):
        raise ValueError(f"{where}: give both the per-channel mean and std or neither, got mean={mean!r}, std={std!r}")
    values = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            value = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"{where}: the {name} must be a list of {num_channels} floats, got {value!r}") from None
        if len(value) != num_channels:
            raise ValueError(f"{where}: the {name} must have one value per latent channel ({num_channels}), got {len(value)}")
        if not all(math.isfinite(v) for v in value) or (name == "std" and min(value) <= 0):
            raise ValueError(f"{where}: the {name} must be finite{' and > 0' if name == 'std' else ''}, got {value}")
        values.append(value)
    return values[0], values[1]


class VAELatentSpace(nn.Module):
    """A frozen ``diffusers.AutoencoderKL`` with its latents normalised.

    Two normalisations, never both:

    - per channel (VA-VAE / LightningDiT): ``(z - mean_c) / std_c`` with the statistics
      ``adatok latent-stats`` measures over training images;
    - scalar (SD-VAE): ``(z - shift) * scale`` with ``scaling_factor`` / ``shift_factor``.

    The statistics come from ``latent_mean`` / ``latent_std`` (``AdaTokConfig.vae_latent_mean`` /
    ``vae_latent_std``), else from ``vae_config``'s ``latents_mean`` / ``latents_std`` (diffusers' own
    AutoencoderKL fields), else -- when no scalar factor was given explicitly either -- from the
    ``config.json`` of the folder at ``vae_path`` when the weights are read from it (``latent-stats``
    writes them there). They live in buffers, so a saved AdaTok checkpoint keeps them. Without any
    statistics the scalar path applies.

    The architecture is built from ``vae_config`` (so the tokenizer can be built, counted and loaded
    with ``from_pretrained`` without the original VAE files: its weights are part of an AdaTok
    checkpoint). The VAE's own weights are read from ``vae_path`` the first time the space is used,
    unless they came with a checkpoint. ``random_init=True`` declares the randomly initialised VAE
    intended (tests); otherwise using the space without weights is an error naming ``vae_path``. The
    VAE never trains: its parameters have ``requires_grad=False`` and it stays in eval mode whatever
    ``train()`` is called with.

    Speed: ``channels_last`` (default :data:`VAE_CHANNELS_LAST`) runs the VAE on NHWC activations (outputs
    equal to float rounding, returned in the ordinary layout); ``autocast`` (``None``, ``"bfloat16"`` or
    ``"float16"``) runs the VAE alone under ``torch.autocast`` even when the caller does not: much faster
    where the hardware has bf16 units, but the latents move by about 2% (relative), so it is off by default.
    """

    def __init__(self, vae_config: dict, vae_path: str | None = None,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 random_init: bool = False, latent_mean: list[float] | None = None,
                 latent_std: list[float] | None = None, channels_last: bool = VAE_CHANNELS_LAST,
                 autocast: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
        check_vae_autocast(autocast)
        self.channels_last = channels_last
        self.autocast = autocast

        arch = {k: v for k, v in vae_config.items() if not k.startswith("_")}
        self.vae = AutoencoderKL(**arch)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.vae_path = vae_path
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else arch.get("scaling_factor", 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else (arch.get("shift_factor") or 0.0))
        self.downsample = 2 ** (len(arch["block_out_channels"]) - 1)
        self.num_channels = int(arch["latent_channels"])
        explicit_scalar = scaling_factor is not None or shift_factor is not None
        if latent_mean is not None or latent_std is not None:
            if explicit_scalar:
                raise ValueError(
                    "vae_latent_mean/vae_latent_std replace vae_scaling_factor/vae_shift_factor: set one "
                    f"normalisation, got both (scaling {scaling_factor!r}, shift {shift_factor!r})"
                )
            stats = check_latent_stats(latent_mean, latent_std, self.num_channels)
        elif not explicit_scalar and (arch.get("latents_mean") is not None or arch.get("latents_std") is not None):
            stats = check_latent_stats(arch.get("latents_mean"), arch.get("latents_std"), self.num_channels,
                                       "vae_config latents_mean/latents_std")
        else:
            stats = None
        # Explicit settings win: the VAE folder's statistics are adopted only when nothing was chosen here.
        self.adopt_folder_stats = stats is None and not explicit_scalar
        mean, std = stats if stats is not None else ([0.0] * self.num_channels, [1.0] * self.num_channels)
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("has_latent_stats", torch.tensor(stats is not None))
        # Saved with the checkpoint: once weights are in, a reloaded model never looks for vae_path.
        self.register_buffer("weights_loaded", torch.tensor(bool(random_init)))

    def train(self, mode: bool = True) -> "VAELatentSpace":
        super().train(mode)
        self.vae.eval()
        return self

    def load_vae_weights(self) -> None:
        """Read the frozen VAE's weights (and, unless set, its per-channel statistics) from ``vae_path``."""
        path = self.vae_path
        if path is None:
            raise FileNotFoundError(
                "this AdaTok uses a VAE latent space but has no VAE weights: set AdaTokConfig.vae_path to a local "
                "diffusers AutoencoderKL folder (or a repo id already in the local Hugging Face cache), e.g. "
                "`--model.vae_path /data/vavae-f16d32-diffusers`; vae_random_init=True is for tests only"
            )
        pretrained = load_pretrained_vae(path)
        missing, unexpected = self.vae.load_state_dict(pretrained.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the VAE at vae_path={path!r} does not match AdaTokConfig.vae_config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; pass that VAE's config as vae_config"
            )
        folder_mean = getattr(pretrained.config, "latents_mean", None)
        folder_std = getattr(pretrained.config, "latents_std", None)
        if self.adopt_folder_stats and not bool(self.has_latent_stats) and folder_mean is not None:
            mean, std = check_latent_stats(folder_mean, folder_std, self.num_channels,
                                           f"latents_mean/latents_std in {path}/config.json")
            self.latent_mean.copy_(torch.tensor(mean))
            self.latent_std.copy_(torch.tensor(std))
            self.has_latent_stats.fill_(True)
        self.weights_loaded.fill_(True)

    def _ensure_weights(self) -> None:
        if not bool(self.weights_loaded):
            self.load_vae_weights()

    def _channel_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.num_channels, 1, 1)
        return (self.latent_mean.to(like.device, torch.float32).view(shape),
                self.latent_std.to(like.device, torch.float32).view(shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B, C, h, w]`` -> the normalised latents AdaTok reads (float32 arithmetic)."""
        if bool(self.has_latent_stats):
            mean, std = self._channel_stats(z)
            return (z.float() - mean) / std
        return (z.float() - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize` (differentiable: losses back-propagate through it)."""
        if bool(self.has_latent_stats):
            mean, std = self._channel_stats(latents)
            return latents.float() * std + mean
        return latents.float() / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._ensure_weights()
        return self.normalize(vae_latents(self.vae, pixels, self.channels_last, self.autocast)).to(pixels.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Not under no_grad: perceptual and adversarial losses back-propagate through the frozen decoder.
        self._ensure_weights()
        dtype = next(self.vae.parameters()).dtype
        z = to_channels_last(self.denormalize(latents).to(dtype), self.channels_last)
        with vae_context(self.autocast, z.device):
            sample = self.vae.decode(z).sample                              # [B, 3, H, W] in [-1, 1]
        return ((sample.to(latents.dtype) + 1.0) * 0.5).contiguous()


def build_latent_space(latent_space: str, num_channels: int = 3, vae_config: dict | None = None,
                       vae_path: str | None = None, scaling_factor: float | None = None,
                       shift_factor: float | None = None, vae_random_init: bool = False,
                       latent_mean: list[float] | None = None, latent_std: list[float] | None = None,
                       vae_channels_last: bool = VAE_CHANNELS_LAST, vae_autocast: str | None = None) -> nn.Module:
    """The latent space named ``latent_space`` (``"pixel"`` or ``"vae"``); see the classes above for the arguments."""
    if latent_space == "pixel":
        return PixelLatentSpace(num_channels)
    if latent_space == "vae":
        if vae_config is None:
            raise ValueError("latent_space='vae' needs vae_config (an AutoencoderKL config dict)")
        return VAELatentSpace(vae_config, vae_path, scaling_factor, shift_factor, vae_random_init,
                              latent_mean, latent_std, channels_last=vae_channels_last, autocast=vae_autocast)
    raise ValueError(f"latent_space must be 'pixel' or 'vae', got {latent_space!r}")
