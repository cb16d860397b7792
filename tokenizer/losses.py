"""Stage-1 (Nested Tail Masking) training losses of AdaTok, eq. (5):

    L_NTM = L_recon(x, x_hat) + lambda_p * L_P(x, x_hat) + lambda_g * L_G(x_hat)

``L_recon`` is the L2 loss the model computes itself (in latent or pixel space, see
``AdaTokModel.forward``); ``L_P`` is LPIPS (:mod:`adatok_vlm.tokenizer.lpips`); ``L_G`` is the
adversarial loss of a PatchGAN discriminator trained with the hinge loss and, optionally, the LeCam
regulariser (Tseng et al., 2021), as in VQGAN (Esser et al., 2021) and TiTok, whose training
settings the paper follows (section 5).

Bottom-up: the PatchGAN discriminator, the hinge/LeCam pieces, the VQGAN adaptive weight, then
:class:`AdaTokStage1Loss`, which holds the discriminator and the perceptual network and exposes one
method per optimizer step. Images are ``[B, 3, H, W]`` in [0, 1]; discriminator logits are
``[B, 1, h, w]`` (one logit per patch); every loss is a scalar.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .lpips import LPIPS

NORMS = ("batch", "group", "none")


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """The pix2pix / taming ``NLayerDiscriminator``: strided 4x4 convs, one logit per ~70px patch.

    ``[B, in_channels, H, W]`` -> logits ``[B, 1, H / 2**num_layers - 2, W / 2**num_layers - 2]``
    (30x30 for 256x256 and 3 layers). Channels double per layer up to ``8 * base_channels``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        # A conv followed by a normalisation with its own shift does not need a bias.
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(channels, out, 4, stride, 1, bias=bias), _norm_layer(norm, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # pix2pix's N(0, 0.02) init; the default kaiming init makes early logits large and the hinge
        # loss saturate before the generator has anything useful to learn from.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> patch logits ``[B, 1, h, w]``."""
        return self.main(images)


# --------------------------------------------------------------------------------------------------
# GAN losses and regularisers
# --------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])``; 0 once real
    logits exceed 1 and fake logits fall below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss ``L_G = -E[D(x_hat)]``: lower as the discriminator finds fakes more real."""
    return -logits_fake.mean()


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                      ema_real: Union[torch.Tensor, float], ema_fake: Union[torch.Tensor, float]) -> torch.Tensor:
    """LeCam regulariser ``E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x_hat))^2]``.

    Keeps the discriminator's predictions near the running means of the other class's logits,
    which bounds how confident it can get on limited data (Tseng et al., 2021).
    """
    return (F.relu(logits_real - ema_fake).square().mean() + F.relu(ema_real - logits_fake).square().mean())


class LeCamEMA(nn.Module):
    """Running means of the real and fake logits for :func:`lecam_regularizer` (buffers, so they
    move with ``.to()`` and save with the state dict)."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        # The first update copies the means: an EMA started at 0 would pull the regulariser towards
        # logit 0 for the first ~1 / (1 - decay) steps.
        decay = self.decay if int(self.num_updates) > 0 else 0.0
        self.ema_real.mul_(decay).add_((1 - decay) * logits_real.detach().float().mean())
        self.ema_fake.mul_(decay).add_((1 - decay) * logits_fake.detach().float().mean())
        self.num_updates.add_(1)


def adaptive_generator_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                              max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive GAN weight ``||d nll / d w|| / (||d L_G / d w|| + 1e-4)``, clamped to
    ``[0, max_weight]`` and detached (w = the decoder's last layer weight).

    It scales the adversarial gradient to the size of the reconstruction gradient at the decoder
    output, so ``lambda_g`` means the same thing whatever the loss scales are. A loss that does not
    reach ``last_layer_weight`` counts as a zero gradient; the result is always finite.
    """
    if not isinstance(last_layer_weight, torch.Tensor) or not last_layer_weight.requires_grad:
        raise ValueError("last_layer_weight must be a parameter that requires grad (the decoder's last layer "
                         f"weight), got {type(last_layer_weight).__name__}")

    def grad_norm(loss: torch.Tensor) -> torch.Tensor:
        if not loss.requires_grad:
            return last_layer_weight.new_zeros(())
        (grad,) = torch.autograd.grad(loss, last_layer_weight, retain_graph=True, allow_unused=True)
        return last_layer_weight.new_zeros(()) if grad is None else torch.linalg.vector_norm(grad.float())

    weight = grad_norm(nll_loss) / (grad_norm(g_loss) + 1e-4)
    return torch.nan_to_num(weight, nan=0.0, posinf=max_weight).clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------------
# The combined stage-1 loss
# --------------------------------------------------------------------------------------------------


def _to_floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    # One device-to-host copy for all the numbers instead of one sync per .item().
    values = torch.stack([v.detach().float().reshape(()) for v in logs.values()]).tolist()
    return dict(zip(logs, values))


class AdaTokStage1Loss(nn.Module):
    """Eq. (5): ``L = L_recon + perceptual_weight * LPIPS + gan_weight * [w_adapt *] L_G``.

    Holds the frozen perceptual network and the trainable PatchGAN discriminator; each optimizer
    step calls one method:

    * :meth:`generator_loss` (tokenizer step): gradients flow into the reconstructions only, never
      into the discriminator's parameters;
    * :meth:`discriminator_loss` (discriminator step): reconstructions are detached, so gradients
      reach the discriminator only.

    ``forward(mode, ...)`` dispatches to either. Under DDP, wrap the discriminator alone
    (``loss.discriminator = accelerator.prepare(loss.discriminator)``): the discriminator step then
    runs one forward and one backward through the wrapper, and the generator step calls the
    unwrapped module with detached parameters, so the wrapper never waits for missing gradients.
    Before ``gan_start_step`` both GAN terms are zero; the discriminator loss is then
    ``0 * sum(params)``, a graph that still reaches every discriminator parameter, so a backward and
    an optimizer step on it are valid. Defaults follow TiTok's stage-2 recipe, which the paper uses.

    Args:
        perceptual_weight: ``lambda_p``.
        perceptual_net: "vgg", "alex", a module ``(x, y) -> [B]``, or None (no perceptual term).
        gan_weight: ``lambda_g``; 0 disables the GAN (no discriminator is built).
        gan_start_step: first step at which the GAN terms are active.
        adaptive_gan_weight: multiply ``lambda_g`` by VQGAN's adaptive weight (needs
            ``last_layer_weight`` in :meth:`generator_loss`).
        max_adaptive_weight: clamp of the adaptive weight.
        lecam_weight: weight of the LeCam regulariser in the discriminator loss (0 = off).
        lecam_decay: EMA decay of the logit means the LeCam regulariser uses.
        disc_in_channels, disc_base_channels, disc_num_layers, disc_norm: PatchGAN sizes.
        perceptual_cache_dir: where the converted LPIPS weights live (default ``$ADATOK_CACHE/lpips``).
    """

    def __init__(self, perceptual_weight: float = 1.0, perceptual_net: Union[str, nn.Module, None] = "vgg",
                 gan_weight: float = 0.1, gan_start_step: int = 20_000, adaptive_gan_weight: bool = False,
                 max_adaptive_weight: float = 1e4, lecam_weight: float = 0.001, lecam_decay: float = 0.99,
                 disc_in_channels: int = 3, disc_base_channels: int = 64, disc_num_layers: int = 3,
                 disc_norm: str = "batch", perceptual_cache_dir: Optional[str] = None):
        super().__init__()
        for name, value in (("perceptual_weight", perceptual_weight), ("gan_weight", gan_weight),
                            ("lecam_weight", lecam_weight), ("max_adaptive_weight", max_adaptive_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(gan_start_step, bool) or not isinstance(gan_start_step, int) or gan_start_step < 0:
            raise ValueError(f"gan_start_step must be an int >= 0, got {gan_start_step!r}")
        self.perceptual_weight = float(perceptual_weight)
        self.gan_weight = float(gan_weight)
        self.gan_start_step = gan_start_step
        self.adaptive_gan_weight = bool(adaptive_gan_weight)
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.lecam_weight = float(lecam_weight)

        if perceptual_net is None or self.perceptual_weight == 0:
            self.perceptual = None
        elif isinstance(perceptual_net, nn.Module):
            self.perceptual = perceptual_net
        elif isinstance(perceptual_net, str):
            self.perceptual = LPIPS(perceptual_net, cache_dir=perceptual_cache_dir)
        else:
            raise TypeError(f"perceptual_net must be 'vgg', 'alex', an nn.Module or None, got {perceptual_net!r}")

        self.discriminator = (PatchGANDiscriminator(disc_in_channels, disc_base_channels, disc_num_layers, disc_norm)
                              if self.gan_weight > 0 else None)
        self.lecam_ema = LeCamEMA(lecam_decay) if self.discriminator is not None and self.lecam_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.gan_start_step

    def forward(self, mode: str, *args, **kwargs):
        if mode == "generator":
            return self.generator_loss(*args, **kwargs)
        if mode == "discriminator":
            return self.discriminator_loss(*args, **kwargs)
        raise ValueError(f"mode must be 'generator' or 'discriminator', got {mode!r}")

    @staticmethod
    def _check_images(target_images: torch.Tensor, recon_images: torch.Tensor) -> None:
        for name, t in (("target_images", target_images), ("recon_images", recon_images)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a tensor [B, C, H, W] in [0, 1], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if target_images.shape != recon_images.shape:
            raise ValueError(f"target_images {tuple(target_images.shape)} and recon_images "
                             f"{tuple(recon_images.shape)} must have the same shape")

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        # The discriminator with its parameters detached: L_G's gradient reaches the images (and the
        # tokenizer) but never the discriminator, without toggling requires_grad on shared state.
        # A DDP wrapper is stepped around: its reducer would wait for gradients that never come.
        disc = getattr(self.discriminator, "module", self.discriminator)
        params = {n: p.detach() for n, p in disc.named_parameters()}
        return functional_call(disc, {**params, **dict(disc.named_buffers())}, (images,))

    def generator_loss(self, target_images: torch.Tensor, recon_images: torch.Tensor, recon_term: torch.Tensor,
                       step: int, last_layer_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The tokenizer's loss, eq. (5).

        Args:
            target_images: ``[B, 3, H, W]`` in [0, 1], the inputs.
            recon_images: ``[B, 3, H, W]`` in [0, 1], the decoded reconstructions (with grad).
            recon_term: scalar ``L_recon`` the model already computed (L2, latent or pixel space).
            step: global training step (gates the GAN term).
            last_layer_weight: the decoder's last layer weight; required when
                ``adaptive_gan_weight`` is on and the GAN is active.

        Returns: ``(loss, logs)``; ``logs`` holds floats: loss, recon, perceptual, gan_g, gan_weight.
        """
        self._check_images(target_images, recon_images)
        if not isinstance(recon_term, torch.Tensor) or recon_term.numel() != 1:
            raise ValueError(f"recon_term must be a scalar tensor, got "
                             f"{tuple(recon_term.shape) if isinstance(recon_term, torch.Tensor) else recon_term!r}")
        recon_term = recon_term.reshape(())
        zero = recon_term.new_zeros(())

        perceptual = self.perceptual(recon_images, target_images).mean() if self.perceptual is not None else zero
        nll = recon_term + self.perceptual_weight * perceptual

        g_loss, weight = zero, zero
        if self.gan_active(step):
            g_loss = hinge_g_loss(self._frozen_discriminator(recon_images))
            if not self.adaptive_gan_weight:
                weight = zero + self.gan_weight
            elif torch.is_grad_enabled():
                if last_layer_weight is None:
                    raise ValueError("last_layer_weight is required when adaptive_gan_weight=True "
                                     "(pass the decoder's last layer weight, e.g. model.last_layer_weight())")
                weight = self.gan_weight * adaptive_generator_weight(nll, g_loss, last_layer_weight,
                                                                     self.max_adaptive_weight)
            # Under no_grad (validation) the adaptive weight has no gradients to compare, so the
            # GAN term is left out of the total, as in VQGAN; gan_g is still logged.
        loss = nll + weight * g_loss
        logs = {"loss": loss, "recon": recon_term, "perceptual": perceptual, "gan_g": g_loss, "gan_weight": weight}
        return loss, _to_floats(logs)

    def discriminator_loss(self, target_images: torch.Tensor, recon_images: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict]:
        """The discriminator's hinge loss (+ LeCam), on detached reconstructions.

        Returns: ``(loss, logs)``; ``logs`` holds floats: d_loss, logits_real, logits_fake, lecam.
        """
        self._check_images(target_images, recon_images)
        if not self.gan_active(step):
            if self.discriminator is None:
                zero = target_images.new_zeros((), requires_grad=True)
            else:
                zero = 0.0 * sum(p.sum() for p in self.discriminator.parameters())
            return zero, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0, "lecam": 0.0}

        # One pass over [real; fake]: one forward per backward keeps DDP happy, and BatchNorm then
        # normalises both with the same statistics, so it cannot tell them apart by batch statistics.
        b = target_images.shape[0]
        logits = self.discriminator(torch.cat([target_images.detach(), recon_images.detach()]))
        logits_real, logits_fake = logits[:b], logits[b:]
        loss = hinge_d_loss(logits_real, logits_fake)
        lecam = loss.new_zeros(())
        if self.lecam_ema is not None:
            if self.training:
                self.lecam_ema.update(logits_real, logits_fake)
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam_ema.ema_real, self.lecam_ema.ema_fake)
            loss = loss + self.lecam_weight * lecam
        logs = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean(), "lecam": lecam}
        return loss, _to_floats(logs)
