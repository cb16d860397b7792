"""The length policy of Adaptive Token Allocation (ATA, AdaTok section 4.2) and a quality/budget dial.

* :func:`length_grid`        the allowed token counts ``[K]`` (the policy's action space).
* :class:`TokenLengthPolicy` ``pi(L | f)``: a light MLP over pooled encoder features that outputs a
  categorical distribution over the K allowed lengths, trained with REINFORCE
  (see :mod:`adatok_vlm.tokenizer.rewards`). At inference one forward pass picks the length: no search.
* :class:`QualityCurveHead`  beyond the paper: predicts each image's whole reconstruction-loss curve
  ``rl(L)`` over the grid, monotone non-increasing by construction, so a caller can ask for
  "the fewest tokens with MSE <= x" (:meth:`QualityCurveHead.min_length_for_quality`) or
  "the best lengths for a mean of N tokens per image" (:func:`allocate_budget`).

The modules take plain arguments and features only; they do not know the tokenizer. Callers pool and
detach the encoder's outputs (``f [B, F]``); ``[B, N, F]`` with an optional boolean ``mask [B, N]``
(True = valid) is mean-pooled here. Lengths are always token counts (e.g. 32), never grid indices,
at the public boundary; the grid is a buffer, so it saves and loads with the state dict.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

LengthsLike = Union[Sequence[int], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Grid helpers
# --------------------------------------------------------------------------------------------------


def _check_int(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def length_grid(min_tokens: int, max_tokens: int, step: int = 1) -> torch.Tensor:
    """Allowed token counts ``min_tokens, min_tokens + step, ..., max_tokens`` as a LongTensor ``[K]``.

    ``max_tokens`` is always included, even when ``max_tokens - min_tokens`` is not a multiple of
    ``step`` (the last step is then shorter): the full representation must stay reachable.
    ``length_grid(8, 256, 8)`` is ``[8, 16, ..., 256]``; ``length_grid(1, 10, 4)`` is ``[1, 5, 9, 10]``.
    """
    min_tokens = _check_int(min_tokens, "min_tokens", 1)
    max_tokens = _check_int(max_tokens, "max_tokens", 1)
    step = _check_int(step, "step", 1)
    if max_tokens < min_tokens:
        raise ValueError(f"max_tokens must be >= min_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    grid = torch.arange(min_tokens, max_tokens + 1, step, dtype=torch.long)
    if int(grid[-1]) != max_tokens:
        grid = torch.cat([grid, torch.tensor([max_tokens], dtype=torch.long)])
    return grid


def _as_grid(lengths: LengthsLike, name: str = "lengths") -> torch.Tensor:
    """A validated grid: 1-D LongTensor of positive, strictly increasing token counts."""
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"{name} must hold integer token counts, got dtype {lengths.dtype}")
        grid = lengths.detach().to(device="cpu", dtype=torch.long).clone()
    else:
        values = list(lengths)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"{name} must hold integer token counts, got {v!r}")
        grid = torch.tensor(values, dtype=torch.long)
    if grid.ndim != 1 or grid.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of token counts, got shape {tuple(grid.shape)}")
    if int(grid[0]) < 1:
        raise ValueError(f"{name} must be >= 1 token each, got {grid.tolist()}")
    if grid.numel() > 1 and not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing, got {grid.tolist()}")
    return grid


def lengths_to_indices(lengths: LengthsLike, grid: torch.Tensor, name: str = "lengths") -> torch.Tensor:
    """Map token counts to their indices on ``grid``; a count not on the grid raises ValueError."""
    lengths = torch.as_tensor(lengths, device=grid.device)
    if lengths.is_floating_point():
        if not bool((lengths == lengths.round()).all()):
            raise ValueError(f"{name} must be whole token counts, got {lengths.tolist()}")
    elif lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must hold integer token counts, got dtype {lengths.dtype}")
    lengths = lengths.long().contiguous()
    idx = torch.searchsorted(grid, lengths).clamp_max(grid.numel() - 1)
    on_grid = grid[idx] == lengths
    if not bool(on_grid.all()):
        off = lengths[~on_grid].unique().tolist()
        raise ValueError(f"{name} {off} not on the length grid {grid.tolist()}")
    return idx


def round_to_grid(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The grid length nearest to each value (ties go to the shorter length); LongTensor, same shape."""
    values = torch.as_tensor(values, device=grid.device)
    dist = (values.unsqueeze(-1).double() - grid.double()).abs()  # [..., K]
    return grid[dist.argmin(dim=-1)]


def first_at_or_below(curves: torch.Tensor, limit) -> torch.Tensor:
    """Per row of ``curves [B, K]`` (non-increasing along K), the index of the first value ``<= limit``
    (a number or ``[B, 1]``); the last index where no value is."""
    ok = curves <= limit
    return torch.where(ok.any(dim=-1), ok.float().argmax(dim=-1), curves.shape[-1] - 1)


def pool_features(features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, F]`` as is, or ``[B, N, F]`` mean-pooled over the valid (``mask`` True) positions."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor, got {type(features).__name__}")
    if features.ndim == 2:
        if mask is not None:
            raise ValueError("mask is only meaningful for features [B, N, F], got features [B, F] and a mask")
        return features
    if features.ndim != 3:
        raise ValueError(f"features must be [B, F] or [B, N, F], got shape {tuple(features.shape)}")
    if mask is None:
        return features.mean(dim=1)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"mask must be a bool tensor [B, N] = {tuple(features.shape[:2])} (True = valid), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    count = mask.sum(dim=1, keepdim=True)
    if bool((count == 0).any()):
        raise ValueError("mask must mark at least one valid position per sample, got an all-False row")
    weights = mask.to(features.dtype).unsqueeze(-1)  # [B, N, 1]
    return (features * weights).sum(dim=1) / count.to(features.dtype)


IMAGE_STATISTICS = ("std", "grad_x", "grad_y", "rms_grad_x", "rms_grad_y", "grad_x_half", "grad_y_half",
                    "laplacian", "rms_laplacian")


def image_statistics(pixels: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Content-complexity statistics of images ``[B, C, H, W]`` in [0, 1]: ``[B, 9]`` log values
    (``IMAGE_STATISTICS``: the per-channel standard deviation, mean |gradient| along x and y, their RMS,
    the same gradients at half resolution, mean |Laplacian| and its RMS), each ``log(max(v, eps))``.

    Why: how many tokens an image needs follows how much detail it has; these numbers measure that
    the same way for every photo, where the encoder's mean-pooled features also say *which* photo it
    is, which a policy trained on a few photos memorises (appended to the policy's features on the
    natural demo, they raised ATA's reward on held-out photos; H7's report to issue #17). Logs keep them on
    the scale of encoder features (about -9 to 0), so no normalisation layer is needed. Computed from
    the pixels the encoder reads: no decoder call. Deterministic; differentiable (not needed: inputs).
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] < 3 or pixels.shape[-2] < 3:
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a tensor [B, C, H, W] with H, W >= 3, got {got}")
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be floating point in [0, 1], got dtype {pixels.dtype}")
    x = pixels.float()
    gx, gy = x[..., 1:] - x[..., :-1], x[..., 1:, :] - x[..., :-1, :]
    half = F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 4 else x
    hx, hy = half[..., 1:] - half[..., :-1], half[..., 1:, :] - half[..., :-1, :]
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    dims = (1, 2, 3)
    stats = torch.stack([x.std(dim=(2, 3)).mean(1), gx.abs().mean(dims), gy.abs().mean(dims),
                         gx.pow(2).mean(dims).sqrt(), gy.pow(2).mean(dims).sqrt(), hx.abs().mean(dims),
                         hy.abs().mean(dims), lap.abs().mean(dims), lap.pow(2).mean(dims).sqrt()], dim=1)
    return stats.clamp_min(eps).log()


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class FeatureMLP(nn.Module):
    """``num_layers`` x (Linear, GELU, Dropout), then a Linear to ``out_dim``, over pooled features.

    No per-sample normalisation of the input: a LayerNorm would discard each feature vector's mean
    and norm, which can carry exactly the content information the heads need (and, for small
    ``feature_dim``, most of it). ``num_layers=0`` is a linear head.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        in_dim = _check_int(in_dim, "feature_dim", 1)
        hidden_dim = _check_int(hidden_dim, "hidden_dim", 1)
        num_layers = _check_int(num_layers, "num_layers", 0)
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            dim = hidden_dim
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = pool_features(features, mask)  # [B, F]
        if f.shape[-1] != self.in_dim:
            raise ValueError(f"features must have feature_dim={self.in_dim} channels, got {f.shape[-1]}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError("features must be finite, got NaN or inf")
        f = f.to(self.out.weight.dtype)
        return self.out(self.body(f))  # [B, out_dim]


# --------------------------------------------------------------------------------------------------
# The policy pi(L | f)
# --------------------------------------------------------------------------------------------------


class TokenLengthPolicy(nn.Module):
    """``pi(L | f)``: a categorical distribution over the allowed token counts (AdaTok section 4.2).

    Args:
        feature_dim: channels ``F`` of the (pooled) encoder features.
        lengths: the allowed token counts, e.g. ``length_grid(1, 256)``; strictly increasing.
        hidden_dim: width of the MLP.
        num_layers: hidden layers of the MLP (0 = linear policy).
        dropout: dropout inside the MLP.

    Every method takes ``features`` ``[B, F]`` (or ``[B, N, F]`` with an optional keyword ``mask``)
    and returns per-sample values ``[B]``. Lengths in and out are token counts from ``self.grid``.
    The last layer starts near zero, so the initial policy is close to uniform over the grid: every
    length gets explored before the rewards shape it.
    """

    def __init__(
        self,
        feature_dim: int,
        lengths: LengthsLike,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.register_buffer("grid", _as_grid(lengths), persistent=True)  # [K]
        self.mlp = FeatureMLP(feature_dim, self.num_lengths, hidden_dim, num_layers, dropout)
        nn.init.normal_(self.mlp.out.weight, std=1e-3)
        nn.init.zeros_(self.mlp.out.bias)

    @property
    def num_lengths(self) -> int:
        return self.grid.numel()

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the grid, ``[B, K]``."""
        return self.mlp(features, mask)

    def distribution(self, features: torch.Tensor, *, mask: Optional[torch.Tensor] = None):
        """``torch.distributions.Categorical`` over grid *indices* (``self.grid[i]`` is the length)."""
        return torch.distributions.Categorical(logits=self(features, mask).float())

    def sample(
        self,
        features: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``L ~ pi(. | f)``: ``(lengths [B] long token counts, log_prob [B], entropy [B])``.

        ``log_prob`` and ``entropy`` carry gradients for :func:`rewards.reinforce_loss`.
        ``generator`` (on the features' device) makes the draw reproducible.
        """
        dist = self.distribution(features, mask=mask)
        idx = torch.multinomial(dist.probs, 1, generator=generator).squeeze(-1)  # [B]
        return self.grid[idx], dist.log_prob(idx), dist.entropy()

    @torch.no_grad()
    def mode(self, features: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The most probable length per sample, ``[B]`` long (deterministic; inference)."""
        return self.grid[self(features, mask).argmax(dim=-1)]

    def expected_length(self, features: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``E_pi[L]`` per sample, float ``[B]`` (the paper's ``L_mean``)."""
        probs = self.distribution(features, mask=mask).probs  # [B, K]
        return probs @ self.grid.to(probs.dtype)

    @torch.no_grad()
    def rounded_expected_length(self, features: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``E_pi[L]`` rounded to the nearest allowed length, ``[B]`` long: where the baseline
        reward ``R(L_mean, f)`` of eq. 8 is measured (the tokenizer can only decode grid lengths)."""
        return round_to_grid(self.expected_length(features, mask=mask), self.grid)

    def log_prob(
        self, features: torch.Tensor, lengths: LengthsLike, *, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``log pi(lengths | f)``, ``[B]``; ``lengths`` are token counts on the grid (else ValueError)."""
        idx = lengths_to_indices(lengths, self.grid)
        return self.distribution(features, mask=mask).log_prob(idx)

    def extra_repr(self) -> str:
        g = self.grid
        return f"lengths={int(g[0])}..{int(g[-1])} (K={g.numel()})"


# --------------------------------------------------------------------------------------------------
# The quality/budget dial: predicted rl(L) curves
# --------------------------------------------------------------------------------------------------


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class QualityCurveHead(nn.Module):
    """Predicts each image's reconstruction-loss curve ``rl(L)`` over the grid, ``[B, K]``.

    Parametrised in log space so it is monotone non-increasing by construction::

        log rl(L_0) = a                         (free)
        log rl(L_k) = a - sum_{j<=k} softplus(d_j)   (each decrement >= 0)

    Trained by regression on measured ``(length, rl)`` pairs (:meth:`curve_loss`, MSE of log rl), it
    answers "fewest tokens for MSE <= x" per image (:meth:`min_length_for_quality`) and, through
    :func:`allocate_budget`, "best lengths for a mean budget over a batch". Same arguments as
    :class:`TokenLengthPolicy`; ``min_rl`` floors measured losses before the log (a perfect
    reconstruction has rl = 0). The head starts at ``rl(L_0) = init_rl`` falling by ``e^3`` (~20x)
    across the grid, a typical shape for MSE on [0, 1] images, so regression starts close.
    """

    def __init__(
        self,
        feature_dim: int,
        lengths: LengthsLike,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        min_rl: float = 1e-8,
        init_rl: float = 0.05,
    ):
        super().__init__()
        self.register_buffer("grid", _as_grid(lengths), persistent=True)  # [K]
        for name, v in (("min_rl", min_rl), ("init_rl", init_rl)):
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        self.min_rl = float(min_rl)
        k = self.num_lengths
        self.mlp = FeatureMLP(feature_dim, k, hidden_dim, num_layers, dropout)
        nn.init.normal_(self.mlp.out.weight, std=1e-3)
        with torch.no_grad():
            self.mlp.out.bias[0] = math.log(init_rl)
            if k > 1:
                self.mlp.out.bias[1:] = _inverse_softplus(3.0 / (k - 1))

    @property
    def num_lengths(self) -> int:
        return self.grid.numel()

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted ``log rl`` over the grid, ``[B, K]``, non-increasing along K."""
        out = self.mlp(features, mask).float()  # [B, K]
        decrements = F.softplus(out[:, 1:])  # [B, K-1], >= 0
        drop = torch.cat([torch.zeros_like(out[:, :1]), decrements.cumsum(dim=-1)], dim=-1)
        return out[:, :1] - drop

    def predict_curve(self, features: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted ``rl(L)`` for every grid length, ``[B, K]``, monotone non-increasing in L."""
        return self(features, mask).exp()

    def curve_loss(
        self,
        features: torch.Tensor,
        lengths: LengthsLike,
        measured_rl: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """MSE in log space between the predicted and measured rl at the measured lengths.

        ``lengths`` (grid token counts) and ``measured_rl`` are ``[B]`` (one measurement per image)
        or ``[B, M]`` (M per image: NTM gives several lengths from one encoder pass).
        """
        measured_rl = torch.as_tensor(measured_rl)
        if not bool(torch.isfinite(measured_rl).all()):
            raise ValueError("measured_rl must be finite, got NaN or inf")
        if bool((measured_rl < 0).any()):
            raise ValueError("measured_rl must be >= 0 (a reconstruction loss), got a negative value")
        idx = lengths_to_indices(lengths, self.grid)
        if tuple(idx.shape) != tuple(measured_rl.shape):
            raise ValueError(
                f"lengths and measured_rl must have the same shape, got {tuple(idx.shape)} and "
                f"{tuple(measured_rl.shape)}"
            )
        log_curve = self(features, mask)  # [B, K]
        if idx.ndim not in (1, 2) or idx.shape[0] != log_curve.shape[0]:
            raise ValueError(
                f"lengths must be [B] or [B, M] with B={log_curve.shape[0]}, got {tuple(idx.shape)}"
            )
        squeeze = idx.ndim == 1
        idx2 = idx.unsqueeze(-1) if squeeze else idx
        pred = log_curve.gather(1, idx2)  # [B, M]
        target = measured_rl.to(pred).clamp_min(self.min_rl).log().reshape(pred.shape)
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def min_length_for_quality(
        self, features: torch.Tensor, max_mse: Union[float, torch.Tensor], *, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The smallest grid length whose predicted rl is <= ``max_mse``, per image, ``[B]`` long;
        the longest length where none is. ``max_mse`` is a number or a per-image tensor ``[B]``."""
        max_mse = torch.as_tensor(max_mse, dtype=torch.float32, device=self.grid.device)
        if not bool(torch.isfinite(max_mse).all()) or bool((max_mse <= 0).any()):
            raise ValueError(f"max_mse must be positive and finite, got {max_mse.tolist()}")
        curve = self.predict_curve(features, mask=mask)  # [B, K]
        if max_mse.ndim == 1:
            if max_mse.shape[0] != curve.shape[0]:
                raise ValueError(f"max_mse must be a number or [B={curve.shape[0]}], got {tuple(max_mse.shape)}")
            max_mse = max_mse.unsqueeze(-1)
        elif max_mse.ndim != 0:
            raise ValueError(f"max_mse must be a number or [B], got shape {tuple(max_mse.shape)}")
        return self.grid[first_at_or_below(curve, max_mse)]

    def extra_repr(self) -> str:
        g = self.grid
        return f"lengths={int(g[0])}..{int(g[-1])} (K={g.numel()}), min_rl={self.min_rl:g}"


# --------------------------------------------------------------------------------------------------
# Budget allocation over a batch
# --------------------------------------------------------------------------------------------------


def allocate_budget(curves: torch.Tensor, lengths_grid: LengthsLike, mean_budget: float) -> torch.Tensor:
    """Per-image lengths ``[B]`` whose mean meets ``mean_budget`` tokens, minimising total rl.

    Greedy marginal allocation: everyone starts at the shortest length; the next grid step always
    goes to the image whose (predicted) rl falls most per token spent, until one more step would
    exceed ``mean_budget * B`` tokens. The result's mean is <= ``mean_budget`` and short of it by less
    than one grid step divided by B (the unspent tokens are less than the step that did not fit).

    Optimality: if every curve is convex and decreasing on the grid (per-token gains non-increasing,
    the paper's diminishing returns, Appendix B.1) and the grid steps are equal, the greedy choice is
    exactly optimal: any allocation is a per-image prefix of steps, convexity makes the ``n`` largest
    gains such a prefix, and no allocation within the budget takes more than ``n`` steps (the exchange
    argument of marginal allocation, Fox 1966). With unequal steps (a shorter last step) it is the
    greedy of the knapsack relaxation: optimal up to the one step that did not fit. On non-convex
    curves a step's priority is the smallest gain rate seen so far on its curve (it cannot be taken
    before the earlier ones); that is what the step-by-step greedy does too.

    Implementation: all ``B * (K - 1)`` steps are ranked once by that priority (a stable sort keeps
    each image's steps in order), and the budget takes a prefix of the ranking: ``O(BK log BK)``
    without a Python loop, milliseconds for thousands of images.

    Args:
        curves: predicted rl per image and grid length, ``[B, K]`` (e.g. ``QualityCurveHead.predict_curve``).
        lengths_grid: the K token counts, strictly increasing.
        mean_budget: mean tokens per image, within ``[lengths_grid[0], lengths_grid[-1]]``.
    """
    if not isinstance(curves, torch.Tensor) or curves.ndim != 2:
        raise ValueError(f"curves must be a tensor [B, K], got {getattr(curves, 'shape', type(curves).__name__)}")
    grid = _as_grid(lengths_grid, "lengths_grid").to(curves.device)
    b, k = curves.shape
    if k != grid.numel():
        raise ValueError(f"curves must have one column per grid length (K={grid.numel()}), got {k}")
    if not bool(torch.isfinite(curves).all()):
        raise ValueError("curves must be finite, got NaN or inf")
    if isinstance(mean_budget, torch.Tensor) and mean_budget.numel() == 1:
        mean_budget = mean_budget.item()
    if isinstance(mean_budget, bool) or not isinstance(mean_budget, Real) or not math.isfinite(mean_budget):
        raise ValueError(f"mean_budget must be a finite number, got {mean_budget!r}")
    lo, hi = int(grid[0]), int(grid[-1])
    if not lo <= mean_budget <= hi:
        raise ValueError(f"mean_budget must lie in [{lo}, {hi}] (the grid's range), got {mean_budget}")
    counts = torch.zeros(b, dtype=torch.long, device=curves.device)
    if b == 0 or k == 1:
        return grid[counts]

    cost = (grid[1:] - grid[:-1]).double()  # [K-1] tokens per step
    c = curves.double()
    rate = (c[:, :-1] - c[:, 1:]) / cost  # [B, K-1] rl decrease per token of each step
    priority = rate.cummin(dim=1).values  # a step waits for the steps before it on its curve
    # Column-major flattening + stable sort: equal priorities keep step order within an image.
    order = torch.sort(priority.t().reshape(-1), descending=True, stable=True).indices
    step_idx = order // b  # [B*(K-1)] which step
    image_idx = order % b  # which image
    spent = cost[step_idx].cumsum(0)  # tokens spent after each ranked step
    available = float(mean_budget) * b - lo * b
    taken = int((spent <= available + 1e-9 * max(1.0, available)).sum())  # a prefix: spent increases
    counts += torch.bincount(image_idx[:taken], minlength=b)
    return grid[counts]


__all__ = [
    "IMAGE_STATISTICS",
    "FeatureMLP",
    "QualityCurveHead",
    "TokenLengthPolicy",
    "allocate_budget",
    "image_statistics",
    "length_grid",
    "lengths_to_indices",
    "pool_features",
    "round_to_grid",
]
