"""Image processor for AdaTok: any image in, ``pixel_values`` float ``[B, 3, size, size]`` in [0, 1] out.

AdaTok's tokenizer reads pixels in [0, 1] (its latent space does its own scaling), and the paper's
quality threshold ``rl_base = 0.02`` of the structured reward (Sec. 4.2) and of the rQPR metric
(Sec. 5.3) is an MSE that this framework measures on images in [0, 1]. So this processor never
normalises with a mean/std: it only converts, resizes, crops or pads, and flips.

Pipeline, per image:

1. **Convert** to float RGB in [0, 1]. 8-bit data is divided by 255 and 16-bit data (PIL ``"I;16"``
   modes, ``"I"``, ``uint16`` arrays) by 65535. Greyscale is replicated to three channels. Images with
   an alpha channel (``RGBA``, ``LA``, palette images with transparency, 4-channel arrays) are
   *composited onto white*: a transparent pixel becomes white, not whatever colour happens to be
   stored under alpha 0 (usually black), which is what a person sees in a viewer.
2. **Geometry**, by ``resize_mode``:

   - ``"shortest_edge"``: resize (``resample``, bicubic by default) so the shorter side is ``size``,
     then crop ``size x size`` at the centre (``crop="center"``) or at a random position
     (``crop="random"``).
   - ``"pad"``: letter-box. An image that fits in ``size x size`` is pasted *unresampled* onto a
     canvas of ``fill_value`` (a 28x28 Fashion-MNIST digit lands in the middle of 32x32 with a 2-pixel
     border); a larger one is first shrunk so its longer side is ``size``. ``crop="center"`` centres
     it, ``crop="random"`` places it at a random offset inside the canvas (translation jitter).
3. **Flip** horizontally with probability 1/2 when ``do_flip`` (training augmentation).

A PIL image is decoded first and turned upright by its EXIF orientation tag (``ImageOps.exif_transpose``:
a phone photo stored sideways comes out as a viewer shows it); a truncated or damaged file is a
``ValueError`` naming ``images[i]`` and PIL's cause.

Random choices use ``generator`` (a ``torch.Generator``) or ``seed`` when given, so they are
reproducible; otherwise torch's global generator, which a seeded ``DataLoader`` seeds per worker.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType

__all__ = ["AdaTokImageProcessor", "AdaTokImageProcessorKwargs", "decode_upright", "to_uint8"]

RESIZE_MODES = ("shortest_edge", "pad")
CROP_MODES = ("center", "random")
RESAMPLE_NAMES = {r.name.lower(): int(r) for r in Image.Resampling}
# PIL modes holding 16 bits per pixel; np.asarray gives uint16 for all of them.
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PIL_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Keys transformers writes into (or reads around) a saved config that are not processor settings.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")
# Floating-point input may overshoot [0, 1] by rounding error; anything further out is an error.
_RANGE_TOLERANCE = 1e-4


class AdaTokImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call keyword arguments of :class:`AdaTokImageProcessor` (on top of transformers' ones).

    ``size`` and ``resample`` are inherited from ``ImagesKwargs``; ``size`` is an int here.
    """

    resize_mode: str | None
    crop: str | None
    do_flip: bool | None
    fill_value: float | None
    seed: int | None
    generator: Any


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size: expected a positive int (the square output side in pixels), got {size!r}")
    return int(size)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def _check_resample(resample: Any) -> int:
    """A PIL resampling filter as an int (JSON-friendly); accepts the enum, its int, or its name."""
    if isinstance(resample, str) and resample.lower() in RESAMPLE_NAMES:
        return RESAMPLE_NAMES[resample.lower()]
    if isinstance(resample, numbers.Integral) and not isinstance(resample, bool):
        if int(resample) in RESAMPLE_NAMES.values():
            return int(resample)
    raise ValueError(
        f"resample: expected a PIL resampling filter ({', '.join(RESAMPLE_NAMES)}; an Image.Resampling "
        f"member, its int value or its name), got {resample!r}"
    )


def _check_fill_value(fill_value: Any) -> float:
    if isinstance(fill_value, bool) or not isinstance(fill_value, numbers.Real) or not 0.0 <= fill_value <= 1.0:
        raise ValueError(f"fill_value: expected a float in [0, 1] (the padding grey level), got {fill_value!r}")
    return float(fill_value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


# ----------------------------------------------------------------------------------------------
# Conversion of one input image to float32 [H, W, 3] in [0, 1]
# ----------------------------------------------------------------------------------------------


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] float in [0, 1] -> [H, W, 3], alpha-blended onto a white background."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + (1.0 - alpha)


def _check_float_range(array: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: expected finite pixel values in [0, 1], got NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{where}: expected floating-point pixel values in [0, 1] (no mean/std normalisation), got values "
            f"in [{low:.4g}, {high:.4g}]; pass uint8 data for 0..255 or rescale to [0, 1] first"
        )
    return np.clip(array, 0.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float ``[..., C, H, W]`` in [0, 1] -> uint8 channels-last ``[..., H, W, C]`` (what PIL and .npz take).

    The project's one float -> 8-bit rounding (clamp, ``* 255``, round half to even): the inverse of the
    processor's ``uint8 / 255``, used by the pipeline's PIL output, the pictures and the FID sample files.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def _array_to_unit_float(array: np.ndarray, where: str) -> np.ndarray:
    """Any numeric array -> float32 in [0, 1], scaled by what its dtype says about its range."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: expected integer pixel values in 0..255 (8-bit) for dtype {array.dtype}, got values in "
                f"[{low}, {high}]; pass 16-bit data as uint16 (scaled by 1/65535)"
            )
        return array.astype(np.float32) / 255.0
    if kind == "f":
        return _check_float_range(array.astype(np.float32), where)
    raise TypeError(f"{where}: expected a numeric (bool, integer or float) image, got dtype {array.dtype}")


def _channels_to_rgb(array: np.ndarray, where: str, layout: str) -> np.ndarray:
    """[H, W] or [H, W, C] float (C in 1, 3, 4) -> [H, W, 3]."""
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 3:
        return array
    if channels == 4:
        return _composite_on_white(array)
    raise ValueError(f"{where}: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels in {layout} layout, got {channels}")


def _pil_to_float(image: Image.Image, where: str) -> np.ndarray:
    mode = image.mode
    if mode in _PIL_16BIT_MODES:
        return _channels_to_rgb(np.asarray(image).astype(np.float32) / 65535.0, where, "HW")
    if mode == "I":
        # 32-bit integer mode; in practice 16-bit PNGs and TIFFs, so the 16-bit range is the scale.
        data = np.asarray(image)
        low, high = int(data.min()), int(data.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{where}: PIL mode 'I' image with values in [{low}, {high}]; expected 0..65535 (16-bit)")
        return _channels_to_rgb(data.astype(np.float32) / 65535.0, where, "HW")
    if mode == "F":
        return _channels_to_rgb(_check_float_range(np.asarray(image, dtype=np.float32), where), where, "HW")
    has_alpha = mode in _PIL_ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0)
    if mode in ("1", "L"):
        return _channels_to_rgb(np.asarray(image.convert("L"), dtype=np.float32) / 255.0, where, "HW")
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def decode_upright(image: Image.Image, where: str) -> Image.Image:
    """Decode a (lazily opened) PIL image and apply its EXIF orientation.

    A truncated or damaged file fails here, as a ``ValueError`` naming ``where`` and PIL's cause,
    not as PIL's bare ``OSError: image file is truncated`` from deep inside the conversion. A camera
    photo stored sideways with an EXIF orientation tag is turned upright (``ImageOps.exif_transpose``),
    as every image viewer shows it. Public so that the training data path turns its images the same way.
    """
    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, ValueError ... for bad data
        raise ValueError(
            f"{where}: the image data cannot be decoded ({type(err).__name__}: {err}); the file is truncated or "
            f"damaged, re-save or re-copy it"
        ) from None
    return image


def _to_float_rgb(image: Any, where: str) -> np.ndarray:
    """One image (PIL, numpy HW/HWC, torch HW/CHW) -> float32 [H, W, 3] in [0, 1]."""
    if isinstance(image, Image.Image):
        array = _pil_to_float(decode_upright(image, where), where)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"{where}: expected a numpy image of shape [H, W] or [H, W, C], got shape {image.shape}")
        if image.size == 0:
            raise ValueError(f"{where}: expected a non-empty image, got a numpy array of shape {image.shape}")
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
            raise ValueError(
                f"{where}: numpy images are channels-last [H, W, C] with C in (1, 3, 4), got shape {image.shape}, "
                f"which looks channels-first; transpose it or pass a torch tensor [C, H, W]"
            )
        array = _channels_to_rgb(_array_to_unit_float(image, where), where, "[H, W, C]")
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (2, 3):
            raise ValueError(f"{where}: expected a tensor image of shape [H, W] or [C, H, W], got {tuple(image.shape)}")
        if image.numel() == 0:
            raise ValueError(f"{where}: expected a non-empty image, got a tensor of shape {tuple(image.shape)}")
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # bf16 / fp16 have no numpy equivalent worth keeping
        array = tensor.numpy()
        if array.ndim == 3:
            if array.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"{where}: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels in [C, H, W] layout, got shape "
                    f"{tuple(image.shape)}"
                )
            array = np.moveaxis(array, 0, -1)
        array = _channels_to_rgb(_array_to_unit_float(array, where), where, "[C, H, W]")
    else:
        raise TypeError(
            f"{where}: expected a PIL.Image.Image, a numpy array [H, W(, C)] or a torch tensor [(C, )H, W], got "
            f"{type(image).__module__}.{type(image).__name__}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: expected a non-empty image, got size {array.shape[0]}x{array.shape[1]}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _as_image_list(images: Any) -> list[Any]:
    """Flatten the accepted input forms into a list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images: expected at least one image, got an empty list")
        for i, image in enumerate(images):
            if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
                raise ValueError(
                    f"images[{i}]: expected a single image inside a list, got a batch of shape {tuple(image.shape)}; "
                    f"pass the batch itself, not a list of batches"
                )
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"images: expected at least one image, got an empty batch of shape {tuple(images.shape)}")
        return list(images)
    if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__"):
        raise TypeError(
            f"images: expected image data, got a {type(images).__name__}; nothing is read from paths or URLs here, "
            f"open the file first (PIL.Image.open(path))"
        )
    return [images]


# ----------------------------------------------------------------------------------------------
# Geometry on float32 [H, W, 3] arrays
# ----------------------------------------------------------------------------------------------


def _resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resample each channel as a 32-bit float PIL image (no 8-bit rounding), then clip the overshoot."""
    if array.shape[:2] == (height, width):
        return array
    channels = [
        np.asarray(Image.fromarray(array[..., c]).resize((width, height), resample=resample))
        for c in range(array.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform int in [0, high), from ``generator`` or torch's global generator."""
    if high <= 1:
        return 0
    return int(torch.randint(high, (1,), generator=generator).item())


def _shortest_edge_crop(
    array: np.ndarray, size: int, crop: str, resample: int, generator: torch.Generator | None, where: str
) -> np.ndarray:
    height, width = array.shape[:2]
    if min(height, width) < 2:
        raise ValueError(
            f"{where}: resize_mode='shortest_edge' crops a {size}x{size} square and needs at least 2 pixels per "
            f"side to resample, got a {height}x{width} image; use resize_mode='pad' for tiny images"
        )
    scale = size / min(height, width)
    new_height = size if height <= width else max(size, round(height * scale))
    new_width = size if width <= height else max(size, round(width * scale))
    array = _resize(array, new_height, new_width, resample)
    if crop == "random":
        top, left = _randint(new_height - size + 1, generator), _randint(new_width - size + 1, generator)
    else:
        top, left = (new_height - size) // 2, (new_width - size) // 2
    return array[top : top + size, left : left + size]


def _letterbox(
    array: np.ndarray, size: int, crop: str, fill_value: float, resample: int, generator: torch.Generator | None
) -> np.ndarray:
    height, width = array.shape[:2]
    if max(height, width) > size:
        scale = size / max(height, width)
        height, width = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
        array = _resize(array, height, width, resample)
    if crop == "random":
        top, left = _randint(size - height + 1, generator), _randint(size - width + 1, generator)
    else:
        top, left = (size - height) // 2, (size - width) // 2
    canvas = np.full((size, size, 3), fill_value, dtype=np.float32)
    canvas[top : top + height, left : left + width] = array
    return canvas


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------


class AdaTokImageProcessor(BaseImageProcessor):
    r"""Turns images into AdaTok's ``pixel_values``: float32 ``[B, 3, size, size]`` in [0, 1].

    Args:
        size (`int`, defaults to 256): side of the square output, in pixels.
        resize_mode (`str`, defaults to ``"shortest_edge"``): ``"shortest_edge"`` (resize the shorter side
            to ``size``, then crop) or ``"pad"`` (letter-box onto a ``fill_value`` canvas; images that fit
            are not resampled, larger ones are shrunk to fit).
        crop (`str`, defaults to ``"center"``): ``"center"`` or ``"random"`` placement of the crop window
            (``"shortest_edge"``) or of the image on the canvas (``"pad"``).
        do_flip (`bool`, defaults to `False`): random horizontal flip with probability 1/2 (training).
        resample (`int`, defaults to ``PIL.Image.Resampling.BICUBIC``): PIL filter for every resize; also
            accepts the enum or its lower-case name. Saved as an int.
        fill_value (`float`, defaults to 0.0): grey level in [0, 1] of the padding in ``"pad"`` mode.

    Inputs (``images``): a PIL image, a list of them, numpy arrays (``[H, W]`` grey, ``[H, W, C]`` with C in
    1/3/4, ``[B, H, W, C]``; uint8 = 0..255, uint16 = 0..65535, float in [0, 1]) or torch tensors
    (``[C, H, W]`` / ``[B, C, H, W]`` float in [0, 1] or uint8). Alpha is composited onto white; see the
    module docstring.

    Example::

        processor = AdaTokImageProcessor(size=32, resize_mode="pad")
        batch = processor(pil_images, return_tensors="pt")       # batch["pixel_values"]: [B, 3, 32, 32]
        processor.save_pretrained(d); AdaTokImageProcessor.from_pretrained(d)
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = AdaTokImageProcessorKwargs

    def __init__(
        self,
        size: int = 256,
        resize_mode: str = "shortest_edge",
        crop: str = "center",
        do_flip: bool = False,
        resample: int = int(Image.Resampling.BICUBIC),
        fill_value: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for key in _SERVICE_KEYS:
            kwargs.pop(key, None)
        auto_map = kwargs.pop("auto_map", None)
        if kwargs:
            raise TypeError(
                f"AdaTokImageProcessor: unexpected argument(s) {sorted(kwargs)}; expected size, resize_mode, crop, "
                f"do_flip, resample, fill_value"
            )
        super().__init__()
        self.size = _check_size(size)
        self.resize_mode = _check_choice("resize_mode", resize_mode, RESIZE_MODES)
        self.crop = _check_choice("crop", crop, CROP_MODES)
        self.do_flip = _check_bool("do_flip", do_flip)
        self.resample = _check_resample(resample)
        self.fill_value = _check_fill_value(fill_value)
        if auto_map is not None:  # written by save_pretrained after register_for_auto_class; keep it
            self.auto_map = auto_map

    # -- preprocessing -----------------------------------------------------------------------

    def preprocess(
        self,
        images: Any,
        *,
        size: int | None = None,
        resize_mode: str | None = None,
        crop: str | None = None,
        do_flip: bool | None = None,
        resample: int | None = None,
        fill_value: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Convert ``images`` to ``BatchFeature({"pixel_values": ...})``.

        Every setting of ``__init__`` can be overridden for this call. ``generator`` (a
        ``torch.Generator``) or ``seed`` (an int) makes ``crop="random"`` and ``do_flip`` reproducible.
        ``return_tensors``: ``"pt"`` -> torch ``[B, 3, S, S]``, ``"np"`` -> numpy ``[B, 3, S, S]``,
        ``None`` -> a list of numpy ``[3, S, S]`` arrays (the transformers convention).
        """
        unknown = sorted(key for key, value in kwargs.items() if value is not None)
        if unknown:
            raise TypeError(
                f"AdaTokImageProcessor.preprocess: unexpected argument(s) {unknown}; expected size, resize_mode, "
                f"crop, do_flip, resample, fill_value, generator, seed, return_tensors"
            )
        size = self.size if size is None else _check_size(size)
        if resize_mode is None:
            resize_mode = self.resize_mode
        resize_mode = _check_choice("resize_mode", resize_mode, RESIZE_MODES)
        crop = self.crop if crop is None else _check_choice("crop", crop, CROP_MODES)
        do_flip = self.do_flip if do_flip is None else _check_bool("do_flip", do_flip)
        resample = self.resample if resample is None else _check_resample(resample)
        fill_value = self.fill_value if fill_value is None else _check_fill_value(fill_value)
        generator = self._resolve_generator(generator, seed)
        if return_tensors is not None and str(getattr(return_tensors, "value", return_tensors)) not in ("pt", "np"):
            raise ValueError(f"return_tensors: expected 'pt', 'np' or None, got {return_tensors!r}")

        pixel_values = []
        for i, image in enumerate(_as_image_list(images)):
            where = f"images[{i}]"
            array = _to_float_rgb(image, where)  # [H, W, 3]
            if resize_mode == "shortest_edge":
                array = _shortest_edge_crop(array, size, crop, resample, generator, where)
            else:
                array = _letterbox(array, size, crop, fill_value, resample, generator)
            if do_flip and bool(torch.rand(1, generator=generator).item() < 0.5):
                array = array[:, ::-1]
            pixel_values.append(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [3, S, S]
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    @staticmethod
    def _resolve_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
        if generator is not None and seed is not None:
            raise ValueError("generator, seed: pass at most one of them, got both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")
            generator = torch.Generator().manual_seed(int(seed))
        return generator

    # -- saving ------------------------------------------------------------------------------

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoImageProcessor"):
        """No-op. transformers calls it after a ``trust_remote_code`` load so that saving copies the class's
        source file; ours lives in the installed package and :meth:`save_pretrained` writes the ``auto_map``."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``preprocessor_config.json`` plus the ``auto_map`` (and ``adatok_vlm_hub.py``) that let
        ``AutoImageProcessor`` load the folder without ``import adatok_vlm`` (with ``trust_remote_code=True``;
        without it transformers then asks for that flag instead of claiming the folder lacks an
        ``image_processor_type`` key). ``push_to_hub=True`` pushes all of it."""
        from .model_card import save_for_hub

        return save_for_hub(self, super().save_pretrained, save_directory, args, kwargs,
                            {"AutoImageProcessor": "AdaTokImageProcessor"}, json_files=("preprocessor_config.json",))

    # -- postprocessing ----------------------------------------------------------------------

    def postprocess(self, pixel_values: Any) -> list[Image.Image]:
        """Turn ``[B, C, H, W]`` or ``[C, H, W]`` values in [0, 1] (C = 3 or 1) into PIL images.

        Values are clamped to [0, 1] (decoders overshoot a little) and rounded to uint8; NaN is an error
        because it means the model, not the picture, is broken.
        """
        if isinstance(pixel_values, BatchFeature):
            pixel_values = pixel_values["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            if not pixel_values:
                raise ValueError("pixel_values: expected at least one image, got an empty list")
            return [image for item in pixel_values for image in self.postprocess(item)]
        if isinstance(pixel_values, torch.Tensor):
            array = pixel_values.detach().float().cpu().numpy()
        elif isinstance(pixel_values, np.ndarray):
            array = pixel_values.astype(np.float32)
        else:
            raise TypeError(
                f"pixel_values: expected a torch tensor or numpy array [B, C, H, W], got {type(pixel_values).__name__}"
            )
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ValueError(
                f"pixel_values: expected shape [B, 3, H, W] or [3, H, W] (or 1 channel), got {array.shape}"
            )
        if np.isnan(array).any():
            raise ValueError("pixel_values: expected values in [0, 1], got NaN")
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        return [
            Image.fromarray(np.ascontiguousarray(image[0])) if image.shape[0] == 1
            else Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
            for image in array
        ]
