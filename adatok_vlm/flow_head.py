"""Flow-matching head: the LM's hidden state -> a distribution over the next continuous image token.

AdaTok's tokens are continuous (no VQ, paper Sec. 5), so an autoregressive LM cannot end in a softmax
over a codebook. Following MAR (Li et al., 2024, "Autoregressive image generation without vector
quantization", its ``DiffLoss``/``SimpleMLPAdaLN``) and VibeVoice's next-token diffusion head, a small
residual MLP, conditioned through adaptive LayerNorm (adaLN, DiT-style) on the LM's hidden state ``z``,
models ``p(x | z)`` of one token ``x`` in ``R^D``. It is trained with (rectified) flow matching in the
generator's convention (:mod:`adatok_vlm.generator.flow_matching`: ``t`` runs from data to noise):

    x_t = (1 - t) * x + t * eps,    eps ~ N(0, I),   t in [0, 1]
    loss = || v_theta(x_t, t, z) - (eps - x) ||^2

and sampled by integrating ``dx/dt = v_theta`` with the generator's solver from ``t = 1`` (noise, scaled
by a temperature) down to ``t = 0``. Each position draws ``batch_mul`` (t, eps) pairs per training step,
which is cheap because the head is small next to the LM. Optional classifier-free guidance mixes a
conditional and an unconditional velocity with the generator's ``cfg_mix``, ``v = v_u + s * (v_c - v_u)``.

One source of truth: the time embedding (``ScalarEmbedder``), ``modulate`` and the final layer are the
DiT's (:mod:`adatok_vlm.generator.modeling_dit`); the time sampling, interpolation, target, guidance mix and
ODE solver are :mod:`adatok_vlm.generator.flow_matching`'s. Only the residual adaLN MLP block is the head's own.

Heads saved before issue 18 ran time the other way (``t = 0`` noise, target ``x - eps``); the state-dict
keys are the same, and :meth:`FlowHead.adopt_noise_to_data_time_` converts such weights exactly (the
time features of ``1 - t`` are a fixed rotation of those of ``t``; the velocity changes sign).

The file reads bottom-up: the adaLN block, the head.
Shapes: ``N`` rows (image positions), ``D`` token channels, ``C`` condition channels, ``W`` head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .generator.flow_matching import (
    TIME_DISTRIBUTIONS,
    cfg_mix,
    integrate,
    interpolate,
    sample_timesteps,
    velocity_target,
)
from .generator.modeling_dit import FinalLayer, ScalarEmbedder, modulate, sinusoidal_embedding

# The DiT's timestep scale: flow time t in [0, 1] -> the sin-cos table's range (DiT's 1000 steps).
TIME_SCALE = 1000.0


# ============================================================================================
# blocks
# ============================================================================================
class AdaLNResBlock(nn.Module):
    """Residual MLP block whose LayerNorm shift/scale and residual gate come from the condition ``c``.

    ``adaLN_modulation`` is zero-initialised, so every block starts as the identity (DiT's adaLN-Zero).
    """

    def __init__(self, width: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)       # 3 x [N, W]
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


# ============================================================================================
# the head
# ============================================================================================
class FlowHead(nn.Module):
    """Velocity network ``v_theta(x_t, t, z)`` plus its flow-matching loss and sampler.

    Args:
        token_dim: ``D``, channels of one image token.
        cond_dim: ``C``, channels of the condition (the LM's hidden size).
        width: ``W``, the residual MLP's width.
        depth: number of :class:`AdaLNResBlock`.
        mlp_ratio: hidden expansion inside each block.
        time_sampling: training times, one of the generator's ``TIME_DISTRIBUTIONS`` (``"uniform"`` or
            ``"logit_normal"``, SD3's, more mass mid-path).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int = 3, mlp_ratio: float = 2.0,
                 time_sampling: str = "uniform"):
        super().__init__()
        if time_sampling not in TIME_DISTRIBUTIONS:
            raise ValueError(f"time_sampling must be one of {TIME_DISTRIBUTIONS}, got {time_sampling!r}")
        self.token_dim = token_dim
        self.time_sampling = time_sampling
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = ScalarEmbedder(width, scale=TIME_SCALE)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def zero_init_(self) -> None:
        """adaLN-Zero: zero every modulation and the output layer (the head starts predicting v = 0)."""
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity ``[N, D]`` at noisy tokens ``x_t [N, D]``, times ``t [N]``, conditions ``cond [N, C]``."""
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x_t.to(dtype))                                    # [N, W]
        c = self.time_embed(t) + self.cond_embed(cond.to(dtype))              # [N, W]
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)                                         # [N, D]

    # ------------------------------------------------------------------ training
    def loss(self, target: torch.Tensor, cond: torch.Tensor, batch_mul: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss, mean over ``N * batch_mul`` draws and ``D`` channels.

        ``target [N, D]`` are the true next tokens, ``cond [N, C]`` the hidden states that predict them.
        """
        if target.shape[0] != cond.shape[0]:
            raise ValueError(f"target has {target.shape[0]} rows but cond has {cond.shape[0]}")
        x0 = target.float().repeat(batch_mul, 1)                              # [N*k, D]
        z = cond.repeat(batch_mul, 1)                                         # [N*k, C]
        t = sample_timesteps(x0.shape[0], self.time_sampling, generator=generator, device=x0.device)   # [N*k]
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        v = self(interpolate(x0, noise, t), t, z).float()
        return F.mse_loss(v, velocity_target(x0, noise))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_steps: int = 25, temperature: float = 1.0,
               cfg_scale: float = 1.0, uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one token per row: Euler integration of the learned flow from noise (``t = 1``) to data.

        Args:
            cond: ``[N, C]`` conditions.
            num_steps: Euler steps.
            temperature: scale of the initial noise (< 1: more conservative samples).
            cfg_scale: classifier-free guidance scale; used with ``uncond`` when != 1.
            uncond: ``[N, C]`` unconditional conditions (e.g. the LM's state without the prompt).
            generator: a ``torch.Generator`` on ``cond``'s device, for reproducible draws.
        Returns:
            ``[N, D]`` float32 tokens.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        guided = uncond is not None and cfg_scale != 1.0
        n = cond.shape[0]
        x = temperature * torch.randn(n, self.token_dim, device=cond.device, generator=generator)
        z = torch.cat([cond, uncond], dim=0) if guided else cond

        def velocity(x_: torch.Tensor, t: float) -> torch.Tensor:
            tb = torch.full((z.shape[0],), t, device=cond.device)
            v = self(torch.cat([x_, x_], dim=0) if guided else x_, tb, z).float()
            return cfg_mix(v[:n], v[n:], cfg_scale) if guided else v

        return integrate(velocity, x, num_steps, "euler")

    # ------------------------------------------------------------------ old checkpoints
    @torch.no_grad()
    def adopt_noise_to_data_time_(self) -> None:
        """Convert, in place, weights trained with the pre-issue-18 time convention (``t = 0`` noise, ``t = 1``
        data, target ``x - eps``) to the generator's: afterwards ``v_new(x, t) = -v_old(x, 1 - t)`` exactly.

        The time features ``[cos(a_k s), sin(a_k s)]`` of ``s = 1 - t`` are a fixed rotation of those of ``t``
        (``a_k = 1000 f_k``: ``cos(a - u) = cos a cos u + sin a sin u``, ``sin(a - u) = sin a cos u - cos a sin u``),
        so the time MLP's first layer absorbs it; the output layer changes sign. The state-dict keys are the same.
        """
        first = self.time_embed.mlp[0]
        w = first.weight.float()                                              # [W, F]
        half = self.time_embed.frequency_size // 2
        table = sinusoidal_embedding(torch.tensor([self.time_embed.scale], device=w.device),
                                     self.time_embed.frequency_size)[0]       # [cos a_k..., sin a_k...]
        cos_a, sin_a = table[:half], table[half:2 * half]
        w_cos, w_sin = w[:, :half].clone(), w[:, half:2 * half].clone()
        w[:, :half] = w_cos * cos_a + w_sin * sin_a
        w[:, half:2 * half] = w_cos * sin_a - w_sin * cos_a
        first.weight.copy_(w.to(first.weight.dtype))
        self.final_layer.linear.weight.neg_()
        self.final_layer.linear.bias.neg_()


__all__ = ["FlowHead", "AdaLNResBlock", "FinalLayer"]
