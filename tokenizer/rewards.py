"""Rewards, advantage and loss of Adaptive Token Allocation (ATA), AdaTok section 4.2.

The policy ``pi(L | f)`` picks a token count ``L`` per image; the tokenizer reconstructs the image
from the first ``L`` tokens and measures its reconstruction loss ``rl`` (pixel MSE on images in
[0, 1]). This file turns ``(rl, L)`` into a learning signal:

* :func:`continuous_reward`   eq. 6  ``R = -alpha * rl - beta * L / L_max``
* :func:`structured_reward`   eq. 7  ``1 + (L_max - L) / L_max`` if ``rl <= rl_base`` else
  ``-(rl - rl_base) * gamma``, smoothed by a sigmoid switch (the paper trains with the smoothed form)
* :func:`relative_advantage`  eq. 8  ``A = R(L) + mu * (R(L) - R(L_mean))``
* :func:`baseline_lengths`, :func:`pool_baseline`  where ``R(L_mean)`` is measured: the readings of the
  paper's "computed on a batch basis" (``BASELINE_READINGS``)
* :func:`entropy_weight`      the decaying weight ``lambda(t)`` of the entropy bonus
* :func:`reinforce_loss`      eq. 9  ``-E[log pi(L|f) * A] - lambda * H(pi)``
* :class:`RewardSpec`         a validated, callable choice of reward and its hyper-parameters

Everything here is pure tensor arithmetic with plain arguments: no model, no config tree.
Every function refuses non-finite inputs with a ``ValueError`` naming the argument, because a
REINFORCE loop that meets one NaN reward trains on it silently and the policy never recovers.
Shapes: per-sample tensors are ``[B]`` (any broadcastable shape works for the rewards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional, Union

import torch

from .policy import round_to_grid

TensorLike = Union[torch.Tensor, float, int]

# Paper defaults (section 4.2 / DESIGN.md).
DEFAULT_ALPHA = 20.0
DEFAULT_BETA = 0.2
DEFAULT_GAMMA = 10.0
DEFAULT_MU = 0.1
DEFAULT_RL_BASE = 0.02

# The sigmoid switch of the structured reward has scale 1 / sharpness (in units of rl); the default
# scale is 2% of rl_base (sharpness 2500 for the paper's 0.02). The switch then goes from 10% to 90%
# within rl_base * (1 -+ 0.044), i.e. +-0.0009 MSE, a couple of tokens of a typical rl(L) curve near
# the threshold: the reward has no jump, yet it is the paper's step for any image whose loss is not
# right at the threshold. The price of smoothing: the efficiency bonus falls by only 1/L_max per
# token, so the smoothed reward peaks a little past the hard threshold length, where the switch's
# remaining gain per token (sharpness * |rl'(L)| * (1 - s) * (R_high - R_low)) has fallen to 1/L_max.
# With the 2% default that is at rl ~ 0.87 * rl_base on curves like rl = 0.2 exp(-L/20) + 0.005
# (4 tokens past the threshold); a 5% width would move it to ~0.73 * rl_base (9 tokens past).
SWITCH_WIDTH_FRACTION = 0.02

SCHEDULES = ("linear", "cosine", "exponential", "constant")
ADVANTAGE_MODES = ("relative", "baseline")
# Readings of eq. 8's "R(L_mean, f) is computed on a batch basis" (see baseline_lengths):
#   image         L_mean = E_pi[L | f_b] per image, baseline R(L_mean_b, f_b) per image;
#   batch_length  L_mean = the batch's mean of E_pi[L | f_b], baseline R(L_mean, f_b) per image;
#   batch_reward  the per-image baselines averaged over the batch: one number for every image.
BASELINE_READINGS = ("image", "batch_length", "batch_reward")
REWARD_KINDS = ("continuous", "structured")


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _float_tensor(x: TensorLike, name: str) -> torch.Tensor:
    """``x`` as a floating tensor (at least float32, so L / L_max stays exact for L <= 2**24)."""
    if isinstance(x, bool) or not isinstance(x, (torch.Tensor, Real)):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(x).__name__}")
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {t.dtype}")
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf)")


def _check_number(x, name: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite plain real number >= minimum (> minimum when strict); returned as float."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if x < minimum or (strict and x == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {x}")
    return x


def _reward_inputs(rl: TensorLike, length: TensorLike, max_length) -> tuple[torch.Tensor, torch.Tensor, float]:
    rl = _float_tensor(rl, "rl")
    _check_finite(rl, "rl")
    length = _float_tensor(length, "length")
    _check_finite(length, "length")
    max_length = _check_number(max_length, "max_length", strict=True)
    if bool((length < 0).any()) or bool((length > max_length).any()):
        raise ValueError(
            f"length must lie in [0, max_length={max_length:g}], "
            f"got values in [{float(length.min()):g}, {float(length.max()):g}]"
        )
    dtype = torch.promote_types(rl.dtype, length.dtype)
    # A plain-number rl must not pull a per-sample length tensor off its device (and vice versa).
    device = length.device if rl.ndim == 0 and rl.device.type == "cpu" else rl.device
    return rl.to(device=device, dtype=dtype), length.to(device=device, dtype=dtype), max_length


# --------------------------------------------------------------------------------------------------
# Rewards (eq. 6, eq. 7)
# --------------------------------------------------------------------------------------------------


def continuous_reward(
    rl: TensorLike,
    length: TensorLike,
    max_length: float,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Eq. 6: ``R = -alpha * rl - beta * length / max_length``, element-wise (broadcasting).

    Args:
        rl: reconstruction loss per sample (e.g. pixel MSE), ``[B]``.
        length: token count used per sample, ``[B]``, in ``[0, max_length]``.
        max_length: ``L_max``, the longest representation (e.g. 256).
        alpha: weight of the reconstruction loss (>= 0).
        beta: weight of the normalised length (>= 0).

    With ``rl(L)`` convex and decreasing in ``L`` (diminishing returns, Appendix B.1), ``R`` is
    concave in ``L`` (Appendix B.2), so every image has one best length.
    """
    rl, length, max_length = _reward_inputs(rl, length, max_length)
    alpha = _check_number(alpha, "alpha")
    beta = _check_number(beta, "beta")
    return -alpha * rl - beta * length / max_length


def default_sharpness(rl_base: float) -> float:
    """Sharpness of the structured reward's switch: ``1 / (SWITCH_WIDTH_FRACTION * rl_base)``.

    2500 for the paper's ``rl_base = 0.02`` (see ``SWITCH_WIDTH_FRACTION``).
    """
    rl_base = _check_number(rl_base, "rl_base", strict=True)
    return 1.0 / (SWITCH_WIDTH_FRACTION * rl_base)


def structured_reward(
    rl: TensorLike,
    length: TensorLike,
    max_length: float,
    rl_base: float = DEFAULT_RL_BASE,
    gamma: float = DEFAULT_GAMMA,
    sharpness: Optional[float] = None,
    hard: bool = False,
) -> torch.Tensor:
    """Eq. 7, the threshold reward: "first meet the quality standard, then save tokens".

    ``R_high = 1 + (L_max - L) / L_max`` (met: 1 plus an efficiency bonus in [0, 1]) and
    ``R_low = -(rl - rl_base) * gamma`` (missed: a penalty growing with the distance to the target).

    By default the switch between the two is a sigmoid, as the paper trains it (section 4.2)::

        s = sigmoid(sharpness * (rl_base - rl))
        R = s * R_high + (1 - s) * R_low

    which is continuous (and smooth) in ``rl``; far from the threshold it equals the piecewise form.
    ``hard=True`` gives the exact piecewise form (``rl <= rl_base`` counts as met).

    Note (paper, Appendix B.3): the piecewise form as written jumps at the threshold, from
    ``R_low -> 0`` to ``R_high(tl*) = 1 + (L_max - tl*) / L_max``. We keep the paper's form because it
    is what the paper trains with; the jump is what makes the length where ``rl`` first meets
    ``rl_base`` the clear maximum. The reward is therefore *not* concave in ``L`` across the
    threshold (the smoothed switch is an S-shaped step); what holds for convex decreasing ``rl(L)``
    is that it is unimodal: it rises up to the threshold length and falls after it (smoothed: the
    peak sits a few tokens past the threshold length, see ``SWITCH_WIDTH_FRACTION``).

    Args:
        rl: reconstruction loss per sample, ``[B]``.
        length: token count per sample, ``[B]``, in ``[0, max_length]``.
        max_length: ``L_max``.
        rl_base: the quality target (MSE), > 0.
        gamma: weight of the shortfall penalty (>= 0).
        sharpness: inverse width of the sigmoid switch, in 1/rl units (> 0). ``None`` uses
            :func:`default_sharpness` (``1 / (0.02 * rl_base)``: the switch is ~2% of rl_base wide).
        hard: use the exact piecewise form (``sharpness`` is then ignored).
    """
    rl, length, max_length = _reward_inputs(rl, length, max_length)
    rl_base = _check_number(rl_base, "rl_base", strict=True)
    gamma = _check_number(gamma, "gamma")
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    r_high = 1.0 + (max_length - length) / max_length
    r_low = -(rl - rl_base) * gamma
    if hard:
        return torch.where(rl <= rl_base, r_high, r_low)
    sharpness = default_sharpness(rl_base) if sharpness is None else sharpness
    sharpness = _check_number(sharpness, "sharpness", strict=True)
    s = torch.sigmoid(sharpness * (rl_base - rl))
    return s * r_high + (1.0 - s) * r_low


# --------------------------------------------------------------------------------------------------
# Advantage (eq. 8), entropy schedule, REINFORCE loss (eq. 9)
# --------------------------------------------------------------------------------------------------


def relative_advantage(
    reward: torch.Tensor,
    baseline_reward: TensorLike,
    mu: float = DEFAULT_MU,
    mode: str = "relative",
) -> torch.Tensor:
    """The learning signal of a sampled length, from its reward and the baseline's.

    ``baseline_reward`` is ``R(L_mean, f)``: the reward the same image gets at the policy's mean
    length ``L_mean = E_pi[L]`` (rounded to an allowed length). It is detached: no gradient flows
    through the baseline.

    * ``mode="relative"`` (eq. 8, the paper's): ``A = R(L) + mu * (R(L) - R(L_mean))``. The absolute
      reward stays in the signal and ``mu`` (0.1) adds a sample-level relative gain on top of it.
    * ``mode="baseline"``: the textbook baseline ``A = R(L) - R(L_mean)``, lower variance, unbiased.

    Both have the same expected gradient direction up to the baseline term; ``mu`` is ignored in
    ``"baseline"`` mode. Returns a tensor of the broadcast shape (``[B]``).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    reward = _float_tensor(reward, "reward")
    _check_finite(reward, "reward")
    baseline_reward = _float_tensor(baseline_reward, "baseline_reward").detach().to(reward.device)
    _check_finite(baseline_reward, "baseline_reward")
    if mode == "baseline":
        return reward - baseline_reward
    mu = _check_number(mu, "mu")
    return reward + mu * (reward - baseline_reward)


def baseline_lengths(expected_lengths: torch.Tensor, grid: torch.Tensor, reading: str = "image") -> torch.Tensor:
    """The grid lengths ``[B]`` at which eq. 8's baseline ``R(L_mean, f_b)`` is measured for each image.

    ``expected_lengths [B]`` is ``E_pi[L | f_b]`` (:meth:`TokenLengthPolicy.expected_length`), ``grid``
    the allowed token counts (the tokenizer can only decode those, so ``L_mean`` is rounded to them).
    ``reading`` (``BASELINE_READINGS``): ``"image"`` and ``"batch_reward"`` round each image's own
    ``E_pi[L]``; ``"batch_length"`` rounds the batch's mean of them, one length for every image.
    Detached: the baseline is a constant for backpropagation (paper, below eq. 8).
    """
    if reading not in BASELINE_READINGS:
        raise ValueError(f"reading must be one of {BASELINE_READINGS}, got {reading!r}")
    expected = _float_tensor(expected_lengths, "expected_lengths").detach()
    _check_finite(expected, "expected_lengths")
    if expected.ndim != 1 or expected.numel() == 0:
        raise ValueError(f"expected_lengths must be a non-empty [B] tensor, got shape {tuple(expected.shape)}")
    if reading == "batch_length":
        expected = expected.mean().expand_as(expected)
    return round_to_grid(expected, grid)


def pool_baseline(baseline_reward: torch.Tensor, reading: str = "image") -> torch.Tensor:
    """The baseline ``[B]`` each image's advantage uses, from the rewards measured at
    :func:`baseline_lengths`: as is, except ``"batch_reward"`` (their batch mean for every image)."""
    if reading not in BASELINE_READINGS:
        raise ValueError(f"reading must be one of {BASELINE_READINGS}, got {reading!r}")
    baseline_reward = _float_tensor(baseline_reward, "baseline_reward").detach()
    _check_finite(baseline_reward, "baseline_reward")
    return baseline_reward.mean().expand_as(baseline_reward) if reading == "batch_reward" else baseline_reward


def entropy_weight(
    step: int,
    total_steps: int,
    start: float,
    end: float = 0.0,
    schedule: str = "linear",
    rate: float = 5.0,
) -> float:
    """The entropy-bonus weight ``lambda(t)``: ``start`` at step 0, ``end`` from ``total_steps`` on.

    With ``t = min(step / total_steps, 1)``:

    * ``"linear"``:      ``start + (end - start) * t``
    * ``"cosine"``:      ``end + (start - end) * (1 + cos(pi * t)) / 2``
    * ``"exponential"``: ``end + (start - end) * (exp(-rate * t) - exp(-rate)) / (1 - exp(-rate))``,
      an exponential decay renormalised to reach ``end`` exactly at ``t = 1`` (so ``end = 0`` works);
      ``rate`` sets how front-loaded it is (5: ~80% of the decay in the first third).
    * ``"constant"``:    ``start``

    Every schedule is monotone non-increasing in ``step`` (``start >= end >= 0`` is required).
    Exploration early, exploitation late: the policy must not collapse before rewards are informative.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, Integral) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    start = _check_number(start, "start")
    end = _check_number(end, "end")
    if end > start:
        raise ValueError(f"end must be <= start for a decaying weight, got start={start}, end={end}")
    rate = _check_number(rate, "rate", strict=True)
    t = min(step / total_steps, 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    decay = (math.exp(-rate * t) - math.exp(-rate)) / (1.0 - math.exp(-rate))
    return end + (start - end) * decay


def reinforce_loss(
    log_prob: torch.Tensor,
    advantage: torch.Tensor,
    entropy: torch.Tensor,
    entropy_weight: TensorLike,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9: ``loss = -mean(log_prob * advantage.detach()) - entropy_weight * mean(entropy)``.

    Args:
        log_prob: ``log pi(L_b | f_b)`` of the sampled lengths, ``[B]``, with gradient.
        advantage: ``A(L_b, f_b)`` from :func:`relative_advantage`, ``[B]`` (detached here).
        entropy: ``H(pi(. | f_b))``, ``[B]`` (or a scalar), with gradient.
        entropy_weight: ``lambda(t)`` from :func:`entropy_weight`, >= 0.

    Returns ``(loss, logs)``: the scalar loss to backpropagate and a dict of floats
    (``loss``, ``policy_loss``, ``entropy``, ``entropy_weight``, ``advantage_mean``,
    ``advantage_std``, ``log_prob_mean``).

    ``log_prob`` and ``advantage`` must have the same shape: a ``[B, 1]`` against a ``[B]`` would
    broadcast to ``[B, B]`` and train every sample on every other sample's advantage.
    """
    for name, t in (("log_prob", log_prob), ("advantage", advantage), ("entropy", entropy)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        _check_finite(t.detach(), name)
    if log_prob.shape != advantage.shape:
        raise ValueError(
            f"log_prob and advantage must have the same shape, got {tuple(log_prob.shape)} "
            f"and {tuple(advantage.shape)}"
        )
    if log_prob.numel() == 0:
        raise ValueError("log_prob must hold at least one sample, got an empty tensor")
    weight = _check_number(entropy_weight, "entropy_weight")
    advantage = advantage.detach()
    policy_loss = -(log_prob * advantage).mean()
    mean_entropy = entropy.mean()
    loss = policy_loss - weight * mean_entropy
    logs = {
        "loss": float(loss.detach()),
        "policy_loss": float(policy_loss.detach()),
        "entropy": float(mean_entropy.detach()),
        "entropy_weight": weight,
        "advantage_mean": float(advantage.float().mean()),
        "advantage_std": float(advantage.float().std(unbiased=False)),
        "log_prob_mean": float(log_prob.detach().float().mean()),
    }
    return loss, logs


# --------------------------------------------------------------------------------------------------
# A validated reward choice
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardSpec:
    """Which reward (eq. 6 or eq. 7) and its hyper-parameters; call it like the reward functions.

    ``RewardSpec()(rl, length, max_length)`` is the paper's continuous reward with alpha=20,
    beta=0.2; ``RewardSpec("structured")`` the smoothed threshold reward with rl_base=0.02, gamma=10.
    Fields not used by ``kind`` are still validated (so a config typo fails early) and ignored.
    ``sharpness=None`` means :func:`default_sharpness`; ``hard=True`` the exact piecewise form.
    """

    kind: str = "continuous"
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA
    rl_base: float = DEFAULT_RL_BASE
    sharpness: Optional[float] = None
    hard: bool = False

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"kind must be one of {REWARD_KINDS}, got {self.kind!r}")
        self.alpha = _check_number(self.alpha, "alpha")
        self.beta = _check_number(self.beta, "beta")
        self.gamma = _check_number(self.gamma, "gamma")
        self.rl_base = _check_number(self.rl_base, "rl_base", strict=True)
        if self.sharpness is not None:
            self.sharpness = _check_number(self.sharpness, "sharpness", strict=True)
        if not isinstance(self.hard, bool):
            raise TypeError(f"hard must be a bool, got {type(self.hard).__name__}")

    def __call__(self, rl: TensorLike, length: TensorLike, max_length: float) -> torch.Tensor:
        if self.kind == "continuous":
            return continuous_reward(rl, length, max_length, alpha=self.alpha, beta=self.beta)
        return structured_reward(
            rl, length, max_length, rl_base=self.rl_base, gamma=self.gamma,
            sharpness=self.sharpness, hard=self.hard,
        )


__all__ = [
    "BASELINE_READINGS",
    "RewardSpec",
    "baseline_lengths",
    "continuous_reward",
    "default_sharpness",
    "entropy_weight",
    "pool_baseline",
    "reinforce_loss",
    "relative_advantage",
    "structured_reward",
]
