"""Flow matching over variable-length token sequences: the training objective and the samplers.

Convention (rectified flow, as in SD3 and SiT): time ``t in [0, 1]`` runs from data to noise,

    x_t = (1 - t) * x0 + t * noise,        v = dx_t / dt = noise - x0,

the model predicts ``v`` (velocity), and sampling integrates ``dx/dt = v`` from ``t = 1`` (pure noise)
down to ``t = 0`` (data). The loss is the squared velocity error averaged over VALID tokens only:
padded positions contribute nothing, whatever values they hold (NaN included).

Classifier-free guidance (Ho & Salimans, 2022) mixes conditional and unconditional velocities on all
channels, ``v = v_null + s * (v_cond - v_null)``, optionally only for ``t`` in a guidance interval
(Kynkäänniemi et al., 2024). Every function takes plain tensors and a model callable
``model(tokens [B, L, D], timesteps [B], class_labels [B], lengths [B]) -> velocity [B, L, D]``;
EMA and the optimiser are the trainer's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..tokenizer import token_mask

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")
SAMPLERS = ("euler", "heun")

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ============================================================================================
# randomness (drawn on the generator's device, then moved: reproducible across devices)
# ============================================================================================
def _rand(shape, generator: torch.Generator | None, device, normal: bool = False) -> torch.Tensor:
    where = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=where).to(device)


def sample_timesteps(batch_size: int, distribution: str = "logit_normal", logit_mean: float = 0.0,
                     logit_std: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Training times ``t [B]`` in (0, 1).

    ``"logit_normal"`` (SD3): ``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``, which favours the
    middle of the path where the velocity is hardest to predict; ``"uniform"``: ``t ~ U(0, 1)``.
    """
    if distribution == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * _rand((batch_size,), generator, device, normal=True))
    if distribution == "uniform":
        return _rand((batch_size,), generator, device)
    raise ValueError(f"time distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}")


def drop_class_labels(class_labels: torch.Tensor, null_class: int, prob: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (classifier-free guidance training)."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"class_dropout_prob must lie in [0, 1), got {prob!r}")
    if prob == 0.0:
        return class_labels
    drop = _rand(class_labels.shape, generator, class_labels.device) < prob
    return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)


# ============================================================================================
# objective
# ============================================================================================
def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * noise`` for ``x0, noise [B, ...]`` (``[B, L, D]`` sequences, ``[N, D]``
    single tokens) and ``t [B]``."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``dx_t / dt = noise - x0`` the model learns to predict."""
    return noise - x0


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid tokens (and all channels) of ``[B, L, D]`` tensors.

    Every valid token weighs the same (a long sequence counts more than a short one, as in language
    modelling). Padded positions are selected away, not multiplied by zero, so NaN/inf there cannot
    reach the loss or its gradient.
    """
    valid = token_mask(lengths, prediction.shape[1])[..., None]           # [B, L, 1]
    err = torch.where(valid, prediction.float() - target.float(), 0.0).pow(2)
    count = valid.sum() * prediction.shape[-1]
    return err.sum() / count.clamp_min(1)


@dataclass
class FlowMatchingOutput:
    """One flow-matching loss evaluation.

    Args:
        loss: scalar, the masked velocity MSE.
        timesteps: ``[B]`` the sampled ``t``.
        class_labels: ``[B]`` the labels the model saw (after class dropout).
        noisy_tokens / target / prediction: ``[B, L, D]`` ``x_t``, ``noise - x0`` and the model's velocity.
    """

    loss: torch.Tensor
    timesteps: torch.Tensor
    class_labels: torch.Tensor
    noisy_tokens: torch.Tensor
    target: torch.Tensor
    prediction: torch.Tensor


def flow_matching_loss(model: ModelFn, tokens: torch.Tensor, lengths: torch.Tensor, class_labels: torch.Tensor,
                       *, null_class: int, class_dropout_prob: float = 0.1, time_distribution: str = "logit_normal",
                       logit_mean: float = 0.0, logit_std: float = 1.0, noise: torch.Tensor | None = None,
                       timesteps: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> FlowMatchingOutput:
    """The flow-matching training loss for a padded batch.

    Args:
        model: ``model(x_t, t, class_labels, lengths) -> velocity`` (e.g. an ``AdaTokDiT`` or its
            Accelerate/DeepSpeed wrapper: the call goes through ``forward``).
        tokens: ``[B, L, D]`` clean tokens ``x0``, already normalised (``AdaTokDiT.normalize_tokens``);
            values past each length are ignored.
        lengths: ``[B]`` valid tokens per sample; class_labels: ``[B]`` in ``0..num_classes-1``.
        null_class: the unconditional class id (``config.num_classes``).
        class_dropout_prob: probability of training a sample unconditionally (``config.class_dropout_prob``).
        time_distribution / logit_mean / logit_std: how ``t`` is drawn (:func:`sample_timesteps`).
        noise / timesteps: fixed draws (tests, evaluation); drawn from ``generator`` when None.
    """
    b = tokens.shape[0]
    valid = token_mask(lengths, tokens.shape[1])[..., None]               # [B, L, 1]
    x0 = torch.where(valid, tokens, 0.0)
    if noise is None:
        noise = _rand(tokens.shape, generator, tokens.device, normal=True).to(tokens.dtype)
    noise = torch.where(valid, noise, 0.0)
    if timesteps is None:
        timesteps = sample_timesteps(b, time_distribution, logit_mean, logit_std, generator, tokens.device)
    labels = drop_class_labels(class_labels, null_class, class_dropout_prob, generator)
    x_t = interpolate(x0, noise, timesteps)                               # [B, L, D]
    target = velocity_target(x0, noise)                                   # [B, L, D]
    prediction = model(x_t, timesteps, labels, lengths)                   # [B, L, D]
    loss = masked_mse(prediction, target, lengths)
    return FlowMatchingOutput(loss=loss, timesteps=timesteps, class_labels=labels, noisy_tokens=x_t,
                              target=target, prediction=prediction)


# ============================================================================================
# sampling
# ============================================================================================
def check_guidance(cfg_scale, guidance_interval) -> tuple[float, tuple[float, float] | None]:
    """Validate ``cfg_scale >= 1`` and ``guidance_interval = (lo, hi)`` with ``0 <= lo <= hi <= 1``."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise TypeError(f"cfg_scale must be a number >= 1, got {type(cfg_scale).__name__} {cfg_scale!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {cfg_scale!r}")
    if guidance_interval is None:
        return float(cfg_scale), None
    if not isinstance(guidance_interval, (tuple, list)) or len(guidance_interval) != 2:
        raise ValueError("guidance_interval must be None or a pair (lo, hi) of times in [0, 1], "
                         f"got {guidance_interval!r}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval!r}")
    return float(cfg_scale), (lo, hi)


def cfg_mix(v_cond: torch.Tensor, v_null: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v = v_null + cfg_scale * (v_cond - v_null)`` on every channel."""
    return v_null + cfg_scale * (v_cond - v_null)


def guided_velocity(model: ModelFn, x: torch.Tensor, t: float, class_labels: torch.Tensor, lengths: torch.Tensor,
                    *, null_class: int, cfg_scale: float = 1.0,
                    guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Velocity at time ``t`` (a float shared by the batch), with classifier-free guidance.

    At ``cfg_scale == 1`` or outside ``guidance_interval`` this is exactly one conditional call.
    Otherwise conditional and null-class inputs run as one doubled batch and
    ``v = v_null + cfg_scale * (v_cond - v_null)`` on every channel.
    """
    b = x.shape[0]
    tb = torch.full((b,), float(t), device=x.device)
    use_cfg = cfg_scale != 1.0 and (guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1])
    if not use_cfg:
        return model(x, tb, class_labels, lengths).float()
    null = torch.full_like(class_labels, null_class)
    v = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([class_labels, null]),
              torch.cat([lengths, lengths])).float()
    return cfg_mix(v[:b], v[b:], cfg_scale)


def time_grid(num_steps: int, device=None) -> torch.Tensor:
    """``num_steps + 1`` uniformly spaced times from 1 (noise) to 0 (data)."""
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)


def integrate(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, num_steps: int,
              sampler: str = "euler", progress: bool = False) -> torch.Tensor:
    """Solve ``dx/dt = velocity(x, t)`` from ``t = 1`` (``x``, noise) down to ``t = 0`` (data) on
    :func:`time_grid`: ``"euler"`` calls ``velocity`` ``num_steps`` times, ``"heun"`` ``2 * num_steps``.

    The one ODE solver of the project: :func:`sample_flow` (the DiT) and the VLM's flow head
    (:mod:`adatok_vlm.flow_head`, one token per row, ``x [N, D]``) both integrate through it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    times = time_grid(num_steps).tolist()
    for i in tqdm(range(num_steps), desc=f"{sampler} sampling", disable=not progress, leave=False):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t                                                   # negative: towards data
        d = velocity(x, t)
        if sampler == "euler":
            x = x + dt * d
        else:
            x_pred = x + dt * d
            x = x + dt * 0.5 * (d + velocity(x_pred, t_next))
    return x


@torch.no_grad()
def sample_flow(model: ModelFn, noise: torch.Tensor, class_labels: torch.Tensor, lengths: torch.Tensor, *,
                null_class: int, num_steps: int = 50, sampler: str = "euler", cfg_scale: float = 1.0,
                guidance_interval: tuple[float, float] | None = None, progress: bool = False) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``t = 1`` (``noise [B, L, D]``) to ``t = 0``.

    ``"euler"`` uses ``num_steps`` model evaluations (x2 under guidance); ``"heun"`` (second order,
    trapezoidal correction) uses ``2 * num_steps``. Positions past each length stay exactly zero.
    Returns float32 ``[B, L, D]`` in the model's (normalised) token space.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    cfg_scale, guidance_interval = check_guidance(cfg_scale, guidance_interval)
    valid = token_mask(lengths, noise.shape[1])[..., None]                # [B, L, 1]
    x = torch.where(valid, noise.float(), 0.0)

    def velocity(x_: torch.Tensor, t: float) -> torch.Tensor:
        v = guided_velocity(model, x_, t, class_labels, lengths, null_class=null_class, cfg_scale=cfg_scale,
                            guidance_interval=guidance_interval)
        return torch.where(valid, v, 0.0)

    return integrate(velocity, x, num_steps, sampler, progress)
