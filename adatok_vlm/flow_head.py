"""Flow-matching head: the LM's hidden state -> a distribution over the next continuous image token.

AdaTok's tokens are continuous (no VQ, paper Sec. 5), so an autoregressive LM cannot end in a softmax
over a codebook. Following MAR (Li et al., 2024, "Autoregressive image generation without vector
quantization", its ``DiffLoss``/``SimpleMLPAdaLN``) and VibeVoice's next-token diffusion head, a small
residual MLP, conditioned through adaptive LayerNorm (adaLN, DiT-style) on the LM's hidden state ``z``,
models ``p(x | z)`` of one token ``x`` in ``R^D``. It is trained with (rectified) flow matching:

    x_t = t * x + (1 - t) * eps,    eps ~ N(0, I),   t in [0, 1]
    loss = || v_theta(x_t, t, z) - (x - eps) ||^2

and sampled by integrating ``dx/dt = v_theta`` with Euler steps from ``t = 0`` (noise, scaled by a
temperature) to ``t = 1``. Each position draws ``batch_mul`` (t, eps) pairs per training step, which is
cheap because the head is small next to the LM. Optional classifier-free guidance mixes a conditional
and an unconditional velocity, ``v = v_u + s * (v_c - v_u)``.

The file reads bottom-up: time embedding, adaLN block, final layer, the head.
Shapes: ``N`` rows (image positions), ``D`` token channels, ``C`` condition channels, ``W`` head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TIME_SAMPLINGS = ("uniform", "logit_normal")


# ============================================================================================
# helpers
# ============================================================================================
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of times ``t [N]`` in [0, 1] (scaled by 1000 like DiT's steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ============================================================================================
# blocks
# ============================================================================================
class TimestepEmbedder(nn.Module):
    """``t [N] -> [N, W]``: sinusoidal features through a two-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


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


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to the velocity ``[N, D]`` (zero-initialised)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ============================================================================================
# the head
# ============================================================================================
class FlowHead(nn.Module):
    """Velocity network ``v_theta(x_t, t, z)`` plus its flow-matching loss and Euler sampler.

    Args:
        token_dim: ``D``, channels of one image token.
        cond_dim: ``C``, channels of the condition (the LM's hidden size).
        width: ``W``, the residual MLP's width.
        depth: number of :class:`AdaLNResBlock`.
        mlp_ratio: hidden expansion inside each block.
        time_sampling: training times, ``"uniform"`` or ``"logit_normal"`` (SD3's, more mass mid-path).
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int = 3, mlp_ratio: float = 2.0,
                 time_sampling: str = "uniform"):
        super().__init__()
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        self.token_dim = token_dim
        self.time_sampling = time_sampling
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
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
    def sample_times(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))

    def loss(self, target: torch.Tensor, cond: torch.Tensor, batch_mul: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss, mean over ``N * batch_mul`` draws and ``D`` channels.

        ``target [N, D]`` are the true next tokens, ``cond [N, C]`` the hidden states that predict them.
        """
        if target.shape[0] != cond.shape[0]:
            raise ValueError(f"target has {target.shape[0]} rows but cond has {cond.shape[0]}")
        x1 = target.float().repeat(batch_mul, 1)                              # [N*k, D]
        z = cond.repeat(batch_mul, 1)                                         # [N*k, C]
        t = self.sample_times(x1.shape[0], x1.device, generator)              # [N*k]
        noise = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=x1.dtype)
        x_t = t[:, None] * x1 + (1 - t[:, None]) * noise
        v = self(x_t, t, z).float()
        return F.mse_loss(v, x1 - noise)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_steps: int = 25, temperature: float = 1.0,
               cfg_scale: float = 1.0, uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one token per row: Euler integration of the learned flow from noise to data.

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
        dt = 1.0 / num_steps
        for i in range(num_steps):
            t = torch.full((z.shape[0],), i * dt, device=cond.device)
            v = self(torch.cat([x, x], dim=0) if guided else x, t, z).float()
            if guided:
                v_c, v_u = v.chunk(2, dim=0)
                v = v_u + cfg_scale * (v_c - v_u)
            x = x + dt * v
        return x


__all__ = ["FlowHead", "AdaLNResBlock", "FinalLayer", "TimestepEmbedder", "timestep_embedding"]
