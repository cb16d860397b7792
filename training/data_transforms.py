"""Natural-image transforms the way the field trains and evaluates on ImageNet.

- Evaluation: :func:`adm_center_crop`, the centre crop of ADM (Dhariwal & Nichol, guided-diffusion's
  ``image_datasets.py``) that every FID-at-256 number in the literature uses: halve the image with a BOX
  filter while its shorter side is at least twice the target (cheap, alias-free downsampling), resize the
  shorter side to ``size`` with BICUBIC, then crop the centre square.
- Training: the same shorter-side resize followed by a *random* square crop (MaskGIT / TiTok's recipe),
  or, with ``scale``, an Inception-style random resized crop (area fraction in ``scale``, aspect ratio in
  ``ratio``); then a horizontal flip with probability 1/2.

Randomness is a pure function of ``(seed, epoch, key)`` (``key`` = the item's index, or its webdataset
``__key__``), never of which worker or rank decoded it, so a run is reproducible and a resumed run draws
the same crops as an uninterrupted one. Letter-boxing of small images (Fashion-MNIST) stays with
:class:`~adatok_vlm.AdaTokImageProcessor`'s ``resize_mode="pad"``.

:class:`NaturalImageTransform` returns what the image processor returns (``{"pixel_values": [N, 3, S, S]}``
in [0, 1]), so :class:`~adatok_vlm.training.data.ImageTransformDataset` takes either.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..tokenizer.image_processing_adatok import decode_upright

__all__ = ["NaturalImageTransform", "adm_center_crop", "item_rng", "random_crop", "shorter_side_resize"]


def item_rng(seed: int, epoch: int, key: Any) -> np.random.Generator:
    """A generator determined by ``(seed, epoch, key)`` alone (``key`` an int or a string)."""
    digest = hashlib.blake2b(f"{int(seed)}|{int(epoch)}|{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _rgb(image: Any) -> Image.Image:
    """``image`` (PIL or a uint8 array) as an RGB PIL image; a PIL image is first decoded and turned upright by
    its EXIF orientation (``decode_upright``, the image processor's rule: a sideways phone photo trains and
    evaluates as it is seen; a no-op for one ``decode_image`` already turned)."""
    if isinstance(image, Image.Image):
        image = decode_upright(image, "image")
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
        raise ValueError(f"image: expected a PIL image or a uint8 [H, W, C] array, got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1))


def shorter_side_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's resize: BOX-halve while the shorter side is >= ``2 * size``, then BICUBIC so it equals ``size``."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    # max(size, .) guards the rounding of the shorter side (it must be exactly size, never size - 1).
    target = tuple(max(size, round(side * scale)) for side in image.size)
    return image.resize(target, resample=Image.Resampling.BICUBIC)


def adm_center_crop(image: Any, size: int) -> Image.Image:
    """The evaluation crop: :func:`shorter_side_resize` then the centre ``size x size`` square."""
    image = shorter_side_resize(_rgb(image), size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_crop(image: Any, size: int, rng: np.random.Generator,
                scale: tuple[float, float] | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A training crop of ``size x size``.

    ``scale=None``: :func:`shorter_side_resize`, then a uniformly placed square (MaskGIT / TiTok).
    ``scale=(lo, hi)``: a window of area fraction in ``[lo, hi]`` and log-uniform aspect ratio in ``ratio``
    (10 tries, else the largest centred square), resized to ``size`` (Inception's random resized crop).
    """
    image = _rgb(image)
    if scale is None:
        image = shorter_side_resize(image, size)
        left = int(rng.integers(image.width - size + 1))
        top = int(rng.integers(image.height - size + 1))
        return image.crop((left, top, left + size, top + size))
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
            break
    else:
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    window = image.crop((left, top, left + w, top + h))
    while min(window.size) >= 2 * size:  # alias-free, as in the evaluation path
        window = window.resize(tuple(side // 2 for side in window.size), resample=Image.Resampling.BOX)
    return window.resize((size, size), resample=Image.Resampling.BICUBIC)


class NaturalImageTransform:
    """Image -> ``FloatTensor[3, size, size]`` in [0, 1] for natural photographs.

    Args:
        size: output side (the model's ``image_size``).
        train: random crop (see :func:`random_crop`) and flip when True; :func:`adm_center_crop` when False.
        seed: the run's seed; each item's randomness is :func:`item_rng` ``(seed, epoch, key)``.
        scale: ``None`` (shorter-side resize + random crop) or an area range for a random resized crop.
        flip: horizontal flip with probability 1/2 in training (never at evaluation).

    ``transform(image, key=i, epoch=e)`` is the per-item call; ``transform(images, return_tensors="pt")``
    mirrors the image processor (keys ``0..N-1``, epoch 0) so the preloading path can use it too.
    """

    def __init__(self, size: int, train: bool, seed: int = 0, scale: tuple[float, float] | None = None,
                 flip: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        if scale is not None:
            try:
                lo, hi = (float(v) for v in scale)
            except (TypeError, ValueError):
                raise ValueError(f"scale: expected None or (low, high) with 0 < low <= high <= 1, got {scale!r}") from None
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"scale: expected None or (low, high) with 0 < low <= high <= 1, got {scale!r}")
            scale = (lo, hi)
        self.size, self.train, self.seed, self.scale, self.flip = size, bool(train), seed, scale, bool(flip)

    def transform(self, image: Any, key: Any = 0, epoch: int = 0) -> torch.Tensor:
        if self.train:
            rng = item_rng(self.seed, epoch, key)
            image = random_crop(image, self.size, rng, self.scale)
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = adm_center_crop(image, self.size)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def __call__(self, images: Any, return_tensors: str = "pt", key: Any = None, epoch: int = 0) -> dict:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        many = isinstance(images, (list, tuple))
        images = list(images) if many else [images]
        keys = range(len(images)) if key is None else ([key] if not many else key)
        return {"pixel_values": torch.stack([self.transform(im, k, epoch) for im, k in zip(images, keys)])}

    def to_dict(self) -> dict:
        """For preloading's cache key (as the image processor's ``to_dict``)."""
        return {"transform": type(self).__name__, "size": self.size, "train": self.train, "seed": self.seed,
                "scale": self.scale, "flip": self.flip}

    def __repr__(self) -> str:
        return f"NaturalImageTransform({self.to_dict()})"
