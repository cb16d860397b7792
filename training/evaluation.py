"""Reconstruction metrics per token count and per length mode (paper Sec. 5.3, Table 1, Fig. 4/5).

rMSE is the per-image mean squared error on images in [0, 1]; rQPR ("reconstruction quality pass
rate") is the share of images whose rMSE is at most a threshold (0.02 in the paper).

:func:`evaluate_reconstructions` measures, for any list of length modes (an int, a per-image
LongTensor ``[N]``, ``"auto"``, ``"sample"``, ``"search"``, ``"oracle"``, ``{"max_mse": x}``,
``{"mean_budget": n}``), per image: tokens used, rMSE, PSNR, SSIM, LPIPS and both ATA rewards
(eq. 6 / eq. 7 with the model's ``reward_*`` settings); per data set: their means, rQPR at any
thresholds, and Frechet distances between the reconstructions and the originals (rFID with the
FID Inception, FD-VGG16 offline; see ``training.fid``).

At scale (rFID over a 50,000-image validation split) the images need not be in memory: ``pixels``
may be any iterable of batches (a DataLoader decoding in workers), and under a ``torch.distributed``
process group every rank evaluates its own shard; the per-image values are all-gathered and the
feature statistics merged exactly across ranks, so every rank ends with the numbers of the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tokenizer.modeling_adatok import pixel_mse
from ..tokenizer.rewards import continuous_reward, structured_reward


def default_lengths(max_tokens: int) -> list[int]:
    """1, 2, 4, ..., up to and including ``max_tokens``."""
    lengths, length = [], 1
    while length < max_tokens:
        lengths.append(length)
        length *= 2
    return lengths + [max_tokens]


def unit_pixels(x: torch.Tensor, device=None) -> torch.Tensor:
    """Images as float in [0, 1] on ``device``: uint8 ``[B, 3, H, W]`` is divided by 255, float kept as is."""
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)


@torch.no_grad()
def errors_at_lengths(model, x: torch.Tensor, lengths, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`AdaTokModel.errors_at_lengths <adatok_vlm.tokenizer.modeling_adatok.AdaTokModel.errors_at_lengths>`
    (the one "error at every length", per-image pixel MSE ``[B, K]``; the paper's ``rl``, eq. 6/7) for data
    as it comes: ``x`` uint8 or float in [0, 1] on any device, the result float32 on the CPU.

    :func:`per_image_mse` (rMSE curves), the reward table of stage 2 (``reward_table.measure_reward_table``)
    and Table 2 (``ablation``) measure through here; ``lengths`` and ``tokens`` as the method takes them.
    """
    return model.errors_at_lengths(unit_pixels(x, model.device), lengths, tokens).cpu()


@torch.no_grad()
def per_image_mse(model, pixels: torch.Tensor, lengths: list[int], batch_size: int = 256,
                  progress: bool = True) -> torch.Tensor:
    """``[N, K]`` per-image pixel MSE of reconstructions from each length in ``lengths``
    (:func:`errors_at_lengths` over ``pixels`` in batches).

    ``pixels`` is uint8 ``[N, 3, H, W]`` or float in [0, 1]. The encoder runs once per image; the
    decoder once per length.
    """
    model.eval()
    if pixels.shape[0] == 0:
        return torch.empty(0, len(lengths))
    starts = range(0, pixels.shape[0], batch_size)
    return torch.cat([errors_at_lengths(model, pixels[start : start + batch_size], lengths)
                      for start in tqdm(starts, desc="evaluating", leave=False, disable=not progress)])


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


# ============================================================================================
# per-image metrics (pure tensor functions; images [B, 3, H, W] in [0, 1])
# ============================================================================================
def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor [B, C, H, W] in [0, 1], got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image pixel MSE ``[B]`` (the paper's rMSE / reconstruction loss ``rl``)."""
    _check_pair(x, y)
    return pixel_mse(x, y)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB for images in [0, 1] (capped at 100 dB)."""
    return psnr_from_mse(mse_per_image(x, y))


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)                 # scipy.ndimage's radius
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5,
                   k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM ``[B]`` (Wang et al., 2004): 11-tap Gaussian window (sigma 1.5), population
    (co)variances, mean over channels and over every position where the window fits the image.

    Equals ``skimage.metrics.structural_similarity(a, b, channel_axis=0, data_range=data_range,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` per image: skimage filters
    with reflect padding and then crops the window radius off every border, so only the "valid"
    positions computed here count. Computed in float64.
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    window = _gaussian_window(sigma, 3.5, torch.float64, x.device)
    k = window.numel()
    if min(h, w) < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels (its Gaussian window), got {h}x{w}")
    x, y = x.double(), y.double()
    wx = window.view(1, 1, 1, k).expand(c, 1, 1, k)
    wy = window.view(1, 1, k, 1).expand(c, 1, k, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:          # separable, valid: [B, C, H-k+1, W-k+1]
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim.flatten(1).mean(1).float()


# ============================================================================================
# length modes
# ============================================================================================
ADAPTIVE_MODES = ("auto", "sample", "search", "oracle")
METRICS = ("rmse", "psnr", "ssim", "lpips", "rqpr", "reward", "fd_vgg16", "fid")
DEFAULT_METRICS = ("rmse", "psnr", "ssim", "lpips", "rqpr", "reward")
FD_METRICS = ("fd_vgg16", "fid")
METRIC_LABELS = {"rmse": "rMSE", "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS",
                 "reward_continuous": "reward (continuous)", "reward_structured": "reward (structured)",
                 "fd_vgg16": "FD-VGG16", "fid": "rFID", "mean_tokens": "tokens"}


def parse_length_spec(text: str):
    """One ``--lengths`` entry: ``"8"`` -> 8, ``"auto"``/``"sample"``/``"search"``/``"oracle"`` as is,
    ``"max_mse=0.02"`` -> ``{"max_mse": 0.02}``, ``"mean_budget=16"`` -> ``{"mean_budget": 16.0}``."""
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text in ADAPTIVE_MODES:
        return text
    key, sep, value = text.partition("=")
    if sep and key in ("max_mse", "mean_budget"):
        try:
            return {key: float(value)}
        except ValueError:
            pass
    raise ValueError(f"length mode {text!r}: expected an int, one of {ADAPTIVE_MODES}, 'max_mse=X' or "
                     "'mean_budget=N'")


def length_label(spec) -> str:
    """A short, unique-enough name for a length mode: ``"8"``, ``"auto"``, ``"max_mse=0.02"``, ``"per_sample"``."""
    if isinstance(spec, bool):
        raise TypeError(f"length mode must be an int, a LongTensor [N], a mode string or a dial dict, got {spec!r}")
    if isinstance(spec, int):
        return str(spec)
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        key, value = next(iter(spec.items()))
        return f"{key}={value:g}"
    if isinstance(spec, torch.Tensor):
        return "per_sample"
    raise TypeError(f"length mode must be an int, a LongTensor [N], a mode string or a dial dict, got {spec!r}")


def _mode_kind(spec) -> str:
    if isinstance(spec, int):
        return "fixed"
    if isinstance(spec, torch.Tensor):
        return "per_sample"
    if isinstance(spec, dict):
        return next(iter(spec))
    return spec


def _check_specs(model, specs, num_images: int) -> list[tuple[str, object]]:
    if not specs:
        raise ValueError("specs: expected at least one length mode")
    m = model.num_latent_tokens
    out, seen = [], set()
    for spec in specs:
        label = length_label(spec)
        if isinstance(spec, int) and not 1 <= spec <= m:
            raise ValueError(f"length {spec} must lie in 1..{m} (this model's num_latent_tokens)")
        if isinstance(spec, torch.Tensor):
            if spec.shape != (num_images,) or spec.is_floating_point() or spec.dtype == torch.bool:
                raise ValueError(f"per-sample lengths must be an integer tensor [{num_images}], got "
                                 f"{spec.dtype} {tuple(spec.shape)}")
            if int(spec.min()) < 1 or int(spec.max()) > m:
                raise ValueError(f"per-sample lengths must lie in 1..{m}, got [{int(spec.min())}, {int(spec.max())}]")
        if isinstance(spec, (str, dict)):
            model._check_mode(spec)
        if label in seen:
            raise ValueError(f"length mode {label!r} is listed twice")
        seen.add(label)
        out.append((label, spec))
    return out


# ============================================================================================
# evaluation over a data set
# ============================================================================================
@dataclass
class EvaluationResult:
    """What :func:`evaluate_reconstructions` measured.

    ``rows``: one dict per length mode, in the order given (``label``, ``mode``, ``mean_tokens``,
    ``std_tokens``, ``min_tokens``, ``max_tokens`` and the requested metrics' data-set values).
    ``per_image[label]``: ``tokens`` and every per-image metric, tensors ``[N]``.
    ``samples[label]``: the first reconstructions ``[K, 3, H, W]`` (plus ``"original"``; this rank's).
    ``reference_statistics[key]``: the originals' feature statistics for each Frechet metric (what a
    gFID "against the split" compares with, without a second pass over the data).
    """

    rows: list[dict]
    per_image: dict[str, dict[str, torch.Tensor]]
    samples: dict[str, torch.Tensor]
    num_images: int
    metrics: tuple[str, ...]
    thresholds: tuple[float, ...]
    notes: list[str] = field(default_factory=list)
    reference_statistics: dict = field(default_factory=dict)

    def row(self, label: str) -> dict:
        for r in self.rows:
            if r["label"] == label:
                return r
        raise KeyError(f"no length mode {label!r}; have {[r['label'] for r in self.rows]}")

    def to_dict(self) -> dict:
        return {"num_images": self.num_images, "metrics": list(self.metrics), "rqpr_thresholds": list(self.thresholds),
                "rows": self.rows, "notes": self.notes}


def rqpr_key(threshold: float) -> str:
    return f"rqpr@{threshold:g}"


def _pixel_batches(pixels, batch_size: int):
    """Batches ``[B, 3, H, W]`` of a tensor, or of an iterable of tensors / collated dicts (``pixel_values``)."""
    if isinstance(pixels, torch.Tensor):
        for start in range(0, pixels.shape[0], batch_size):
            yield pixels[start : start + batch_size]
        return
    for batch in pixels:
        x = batch["pixel_values"] if isinstance(batch, dict) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"pixels: every batch must be [B, 3, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[0]:
            yield x


@torch.no_grad()
def evaluate_reconstructions(model, pixels, specs, metrics=DEFAULT_METRICS, *,
                             thresholds: tuple[float, ...] | None = None, batch_size: int = 64,
                             lpips=None, lpips_net: str = "alex", extractors=None, keep_samples: int = 8,
                             progress: bool = True, distributed: bool | None = None) -> EvaluationResult:
    """Reconstruct ``pixels`` at every length mode in ``specs`` and measure them.

    Args:
        model: an :class:`AdaTokModel` (its device is used).
        pixels: uint8 ``[N, 3, H, W]`` or float in [0, 1]; or an iterable of such batches (or of
            :func:`~adatok_vlm.training.data.collate_images` dicts), streamed: nothing is kept but the
            per-image numbers, running feature statistics and ``keep_samples`` pictures.
        specs: length modes: ints, LongTensors ``[N]`` (per image; only with a tensor), ``"auto"``, ``"sample"``,
            ``"search"``, ``"oracle"``, ``{"max_mse": x}``, ``{"mean_budget": n}``.
        metrics: any of :data:`METRICS`. ``"reward"`` gives both rewards; ``"fid"`` / ``"fd_vgg16"``
            need ``extractors`` (or build VGG16 features / need the Inception weights otherwise).
        thresholds: rQPR thresholds (default: the model's ``reward_rl_base``, the paper's 0.02).
        lpips: an :class:`~adatok_vlm.tokenizer.lpips.LPIPS` module; built from ``lpips_net`` if None.
        extractors: ``{"fid": FeatureExtractor, "fd_vgg16": ...}`` for the Frechet distances.
        keep_samples: how many reconstructions per mode to keep for pictures.
        distributed: ``pixels`` is this rank's shard of the set, and the results are combined over the
            ``torch.distributed`` group (per-image values all-gathered in rank order, statistics merged);
            None: whenever a group of more than one rank is initialised. Call on every rank.

    Fixed lengths and per-image lengths share one encoder pass per batch (the prefixes nest); the
    other modes call ``encode(num_tokens=mode)``. Frechet distances compare each mode's
    reconstructions with the originals (rFID): features are folded into running statistics.
    """
    from .fid import (RunningStatistics, all_gather_rows, all_reduce_statistics, build_feature_extractor,
                      frechet_distance_between, process_world)

    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; choose from {list(METRICS)}")
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() != 4:
            raise ValueError(f"pixels must be [N, 3, H, W] (uint8 or float in [0, 1]), got {tuple(pixels.shape)}")
        n = pixels.shape[0]
    elif isinstance(pixels, (str, bytes, dict)) or not hasattr(pixels, "__iter__"):
        raise ValueError("pixels must be [N, 3, H, W] (uint8 or float in [0, 1]) or an iterable of such batches, "
                         f"got {type(pixels).__name__}")
    else:
        n = None
        if any(isinstance(spec, torch.Tensor) for spec in specs):
            raise ValueError("per-sample lengths (a tensor [N]) need pixels as a tensor, not an iterable of batches")
    _, world = process_world(distributed)
    specs = _check_specs(model, list(specs), n)
    c = model.config
    m = model.num_latent_tokens
    thresholds = tuple(float(t) for t in (thresholds or (c.reward_rl_base,)))
    model.eval()
    device = model.device
    if "lpips" in metrics and lpips is None:
        from ..tokenizer.lpips import LPIPS

        lpips = LPIPS(lpips_net)
    if lpips is not None:
        lpips = lpips.to(device)
    extractors = dict(extractors or {})
    for key in FD_METRICS:
        if key in metrics and key not in extractors:
            extractors[key] = build_feature_extractor(key, device=device)
    extractors = {k: e for k, e in extractors.items() if k in metrics}
    for key, extractor in extractors.items():
        if extractor.metric != key:
            raise ValueError(f"extractors[{key!r}] computes {extractor.metric!r} features")
    if extractors and n is not None and n < 2 and world == 1:
        raise ValueError("Frechet distances need at least 2 images")

    wanted = [k for k in ("ssim", "lpips") if k in metrics]
    per_image = {label: {k: [] for k in ("tokens", "rmse", *wanted)} for label, _ in specs}
    samples = {label: [] for label, _ in specs}
    samples["original"] = []
    reference = {k: RunningStatistics(e.dim, e.name) for k, e in extractors.items()}
    recon_stats = {label: {k: RunningStatistics(e.dim, e.name) for k, e in extractors.items()} for label, _ in specs}

    start = 0
    batches = _pixel_batches(pixels, batch_size)
    total = None if n is None else math.ceil(n / batch_size)
    for x in tqdm(batches, total=total, desc="evaluating reconstructions", leave=False, disable=not progress):
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)
        b = x.shape[0]
        keep = max(0, min(keep_samples - start, b))
        if keep:
            samples["original"].append(x[:keep].cpu())
        for key, extractor in extractors.items():
            reference[key].update(extractor(x))
        full = None
        for label, spec in specs:
            if isinstance(spec, (int, torch.Tensor)):
                if full is None:
                    full = model.encode(x)                                  # all m tokens, once per batch
                if isinstance(spec, int):
                    lengths = torch.full((b,), spec, dtype=torch.long, device=device)
                else:
                    lengths = spec[start : start + b].to(device).long()
                tokens = full.tokens[:, : int(lengths.max())]
            else:
                enc = model.encode(x, num_tokens=spec)
                tokens, lengths = enc.tokens, enc.lengths
            recon = model.decode(tokens, lengths).float()
            record = per_image[label]
            record["tokens"].append(lengths.cpu())
            record["rmse"].append(mse_per_image(recon, x).cpu())
            if "ssim" in record:
                record["ssim"].append(ssim_per_image(recon, x).cpu())
            if "lpips" in record:
                record["lpips"].append(lpips(recon, x).float().cpu())
            for key, extractor in extractors.items():
                recon_stats[label][key].update(extractor(recon))
            if keep:
                samples[label].append(recon[:keep].cpu())
        start += b

    if world > 1:                   # every rank's shard together, in rank order
        for label, _ in specs:
            per_image[label] = {k: [all_gather_rows(torch.cat(v) if v else
                                                    torch.empty(0, dtype=torch.long if k == "tokens" else torch.float),
                                                    True)]
                                for k, v in per_image[label].items()}
        reference = {k: all_reduce_statistics(r, True) for k, r in reference.items()}
        recon_stats = {label: {k: all_reduce_statistics(r, True) for k, r in stats.items()}
                       for label, stats in recon_stats.items()}
    n = int(sum(t.shape[0] for t in per_image[specs[0][0]]["tokens"]))
    if n == 0:
        raise ValueError("pixels: no image to evaluate")
    if extractors and n < 2:
        raise ValueError("Frechet distances need at least 2 images")

    rows, notes = [], []
    for label, spec in specs:
        record = {k: torch.cat(v) for k, v in per_image[label].items()}
        tokens, rl = record["tokens"], record["rmse"]
        record["psnr"] = psnr_from_mse(rl)
        record["reward_continuous"] = continuous_reward(rl, tokens, m, c.reward_alpha, c.reward_beta).float()
        record["reward_structured"] = structured_reward(rl, tokens, m, c.reward_rl_base, c.reward_gamma).float()
        per_image[label] = record
        t = tokens.float()
        row = {"label": label, "mode": _mode_kind(spec), "mean_tokens": float(t.mean()),
               "std_tokens": float(t.std()) if t.numel() > 1 else 0.0,
               "min_tokens": int(tokens.min()), "max_tokens": int(tokens.max())}
        for key in ("rmse", "psnr", "ssim", "lpips"):
            if key in metrics:
                row[key] = float(record[key].mean())
        if "rqpr" in metrics:
            for threshold in thresholds:
                row[rqpr_key(threshold)] = float((rl <= threshold).float().mean())
        if "reward" in metrics:
            row["reward_continuous"] = float(record["reward_continuous"].mean())
            row["reward_structured"] = float(record["reward_structured"].mean())
        for key in extractors:
            row[key] = frechet_distance_between(recon_stats[label][key].finalize(), reference[key].finalize())
        rows.append(row)
    for key, extractor in extractors.items():
        if n <= extractor.dim:
            notes.append(f"{extractor.label} from {n} images, fewer than its {extractor.dim} feature dimensions: "
                         "the estimate is strongly biased upwards; compare values only at equal image counts "
                         "(the paper's rFID uses 50,000).")
    samples = {k: torch.cat(v) if v else torch.empty(0) for k, v in samples.items()}
    statistics = {k: r.finalize() for k, r in reference.items()}
    return EvaluationResult(rows, per_image, samples, n, metrics, thresholds, notes, statistics)


def reconstruction_fd(model, pixels, num_tokens, extractor, batch_size: int = 64,
                      progress: bool = True) -> float:
    """rFID (with the Inception extractor) or rFD-VGG16 of ``pixels`` (a tensor or an iterable of
    batches) reconstructed at one length mode."""
    result = evaluate_reconstructions(model, pixels, [num_tokens], metrics=(extractor.metric,), batch_size=batch_size,
                                      extractors={extractor.metric: extractor}, keep_samples=0, progress=progress)
    return result.rows[0][extractor.metric]


# ============================================================================================
# reporting
# ============================================================================================
def markdown_table(result: EvaluationResult) -> str:
    """One row per length mode, one column per measured value."""
    columns = [("mean_tokens", "tokens", "{:.2f}")]
    for key in ("rmse", "psnr", "ssim", "lpips"):
        if key in result.metrics:
            columns.append((key, METRIC_LABELS[key], {"psnr": "{:.2f}"}.get(key, "{:.4f}")))
    if "rqpr" in result.metrics:
        columns += [(rqpr_key(t), f"rQPR@{t:g}", "{:.3f}") for t in result.thresholds]
    if "reward" in result.metrics:
        columns += [("reward_continuous", "R cont.", "{:.4f}"), ("reward_structured", "R struct.", "{:.4f}")]
    columns += [(k, METRIC_LABELS[k], "{:.3f}") for k in FD_METRICS if k in result.metrics]
    lines = ["| length | " + " | ".join(c[1] for c in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for row in result.rows:
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"{result.num_images} images. PSNR is the mean of per-image PSNRs; SSIM uses an 11-tap Gaussian "
              "window (sigma 1.5); rQPR@t is the share of images with rMSE <= t."]
    lines += [f"Note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
