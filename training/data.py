"""Image data for AdaTok training: one path through Hugging Face ``datasets``.

Every loader returns a :class:`datasets.Dataset` with an ``image`` column (``datasets.Image()``, PIL on
access) and, where classes are known, a ``label`` column (``ClassLabel`` with names):

- :func:`load_fashion_mnist` -- the IDX files of Debian's ``dataset-fashion-mnist`` (28x28 grey), parsed
  here with numpy and cached with ``save_to_disk`` so later loads are memory-mapped and instant;
- :func:`load_natural_crops` -- multi-scale random crops of the colour photographs bundled inside
  scikit-image and scikit-learn (read from the installed package folders; nothing is fetched);
- :func:`load_image_dataset` -- one entry point for those two, an image folder, a ``save_to_disk``
  directory or a Hugging Face dataset already in the local cache (never downloaded here).

Training reads them through :class:`ImageTransformDataset` (decodes each image itself and applies an
:class:`~adatok_vlm.AdaTokImageProcessor`), :func:`collate_images` and :func:`build_dataloader`. A corrupt
image never stops training: its item becomes a :class:`SkippedImage`, the collate function drops it and
reports it *inside the batch* (``batch["skipped"]``, so counts survive DataLoader worker processes), and
the trainer adds the batches up in a :class:`SkipCounter`::

    ds = load_image_dataset("fashion_mnist", split="train")
    loader = build_dataloader(ds, AdaTokImageProcessor(size=32, resize_mode="pad"), batch_size=256,
                              shuffle=True, num_workers=2, seed=0)
    counter = SkipCounter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:              # batch["pixel_values"]: [B, 3, 32, 32], batch["labels"]: [B]
            counter.update(batch)
            ...
        print(counter.summary())
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "NATURAL_PHOTOS",
    "SKIP_REASONS",
    "ImageDataLoader",
    "ImageDecodeError",
    "ImageTransformDataset",
    "SkipCounter",
    "SkippedImage",
    "build_dataloader",
    "collate_images",
    "decode_image",
    "default_cache_dir",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_natural_crops",
    "natural_photo_paths",
    "read_idx",
]

# Bump when the layout of a cached data set changes, so stale caches are rebuilt rather than misread.
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Where built data sets are cached: ``$ADATOK_CACHE/data``, else ``~/.cache/adatok-vlm/data``."""
    root = os.environ.get("ADATOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adatok-vlm")
    return Path(root) / "data"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_dataset(
    png: list[bytes], labels: np.ndarray, class_names: Sequence[str], fingerprint: str
) -> datasets.Dataset:
    """An in-memory ``Dataset`` of PNG-encoded images with a deterministic fingerprint.

    Encoding the images ourselves and handing ``datasets`` ``{"bytes": ...}`` dicts skips its per-example
    PIL round trip; the explicit fingerprint lets fingerprint-keyed caches (e.g. preloading) hit across runs.
    """
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    built = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in png], "label": labels.astype(np.int64)}, features=features
    )
    return datasets.Dataset(built.data, info=built.info, fingerprint=fingerprint)


def _save_atomically(dataset: datasets.Dataset, target: Path) -> None:
    """``save_to_disk`` into a temporary sibling, then rename: readers never see a half-written cache,
    and when several processes (ranks) build at once the first rename wins and the others discard theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        dataset.save_to_disk(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _limit(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    if limit is None:
        return dataset
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
    return dataset.select(range(min(limit, len(dataset))))


# ==============================================================================================
# Fashion-MNIST from Debian's IDX files
# ==============================================================================================

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None, max_items: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed), as in LeCun's MNIST format.

    Header: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32 sizes;
    the data follow. ``max_items`` reads only the first items along axis 0. A wrong magic number, a size
    mismatch or a truncated/corrupt file raises ``ValueError`` naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path}: cannot read the IDX file ({type(err).__name__}: {err}); it is truncated or corrupt"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: expected an IDX file with {expected_ndim} dimension(s), got {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header}; it is truncated or corrupt"
        )
    count = shape[0] if max_items is None else min(shape[0], max_items)
    data = np.frombuffer(raw, dtype=dtype, count=count * math.prod(shape[1:]), offset=header)
    return data.reshape((count, *shape[1:])).astype(dtype.newbyteorder("="))  # a writable, native-order copy


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    limit: int | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
) -> datasets.Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes) from Debian's IDX files.

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        limit: keep only the first ``limit`` rows.
        cache_dir: where the built data set is saved (``save_to_disk``) and re-read from; ``None`` ->
            :func:`default_cache_dir`, ``False`` -> never cache. The cache key includes the source files'
            sizes and modification times. A limited load reuses a full cache but never writes one.

    Returns a ``Dataset`` with ``image`` (PIL ``"L"``, 28x28) and ``label`` (``ClassLabel``).
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split: expected one of {list(_FASHION_MNIST_FILES)} for Fashion-MNIST, got {split!r}")
    files = [Path(root) / name for name in _FASHION_MNIST_FILES[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}. They come from the Debian package "
            f"dataset-fashion-mnist: `apt-get install dataset-fashion-mnist` (installs to {FASHION_MNIST_ROOT}), or "
            f"pass root= pointing at a folder with the same IDX files."
        )
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = _fingerprint("fashion_mnist", _CACHE_VERSION, split, stats)

    cache_path = None
    if cache_dir is not False:
        root_dir = Path(default_cache_dir() if cache_dir in (None, True) else cache_dir)
        cache_path = root_dir / f"fashion_mnist-{split}-{fingerprint}"
        if cache_path.is_dir():
            try:
                return _limit(datasets.load_from_disk(str(cache_path)), limit)
            except Exception as err:  # a damaged cache is rebuilt, never fatal
                warnings.warn(f"rebuilding the Fashion-MNIST cache at {cache_path}: it could not be read ({err})")
                shutil.rmtree(cache_path, ignore_errors=True)

    images = read_idx(files[0], expected_ndim=3, max_items=limit)
    labels = read_idx(files[1], expected_ndim=1, max_items=limit)
    if len(images) != len(labels):
        raise ValueError(f"{files[0]} holds {len(images)} images but {files[1]} holds {len(labels)} labels")
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{files[0]}: expected uint8 28x28 images, got {images.dtype} {images.shape[1:]}")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{files[1]}: labels must be < {len(FASHION_MNIST_CLASSES)}, got {int(labels.max())}")
    png = [_png_bytes(a) for a in images]
    if limit is not None:
        return _image_dataset(png, labels, FASHION_MNIST_CLASSES, f"{fingerprint}-{len(images)}")
    dataset = _image_dataset(png, labels, FASHION_MNIST_CLASSES, fingerprint)
    if cache_path is None:
        return dataset
    _save_atomically(dataset, cache_path)
    return datasets.load_from_disk(str(cache_path))  # memory-mapped: cheap to share with workers


# ==============================================================================================
# Multi-scale crops of the photographs bundled with scikit-image and scikit-learn
# ==============================================================================================

# (name, package, file inside the package). Only files that ship inside the wheels: scikit-image fetches
# its other images with pooch (network), so they are deliberately absent, and files are read directly
# with PIL rather than through skimage.data's fetchers so nothing can reach for the network.
NATURAL_PHOTOS = (
    ("astronaut", "skimage", "data/astronaut.png"),
    ("chelsea", "skimage", "data/chelsea.png"),
    ("coffee", "skimage", "data/coffee.png"),
    ("rocket", "skimage", "data/rocket.jpg"),
    ("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg"),
    ("retina", "skimage", "data/retina.jpg"),
    ("immunohistochemistry", "skimage", "data/ihc.png"),
    ("motorcycle", "skimage", "data/motorcycle_left.png"),
    ("china", "sklearn", "datasets/images/china.jpg"),
    ("flower", "sklearn", "datasets/images/flower.jpg"),
)


def natural_photo_paths() -> dict[str, Path]:
    """The bundled colour photographs present in this environment, by name (missing ones are left out)."""
    import importlib.util

    found = {}
    for name, package, relative in NATURAL_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found[name] = path
    return found


@lru_cache(maxsize=1)
def _natural_photos() -> tuple[tuple[str, Image.Image], ...]:
    photos = []
    for name, path in natural_photo_paths().items():
        try:
            with Image.open(path) as image:
                photos.append((name, image.convert("RGB")))
        except Exception as err:  # an unreadable bundled file costs one source, not the data set
            warnings.warn(f"skipping natural photo {name!r} ({path}): {err}")
    return tuple(photos)


def load_natural_crops(
    num_crops: int,
    crop_size: int = 32,
    seed: int | Sequence[int] = 0,
    scale_range: tuple[float, float] = (0.125, 1.0),
) -> datasets.Dataset:
    """``num_crops`` random ``crop_size``-pixel RGB crops of the bundled colour photographs.

    Each crop picks a photo uniformly, a scale ``s`` log-uniformly in ``scale_range`` (the photo is
    notionally downscaled by ``s`` first, so a crop covers ``crop_size / s`` original pixels: texture at
    ``s = 1``, whole objects at small ``s``) and a uniform position; the window is resampled with an
    antialiased bicubic filter. Deterministic given ``seed`` (an int, or a sequence of ints naming an
    independent stream, as numpy's ``default_rng`` takes), and crop ``i`` does not depend on
    ``num_crops`` (a longer set extends a shorter one). ``label`` is the source photo, named.
    """
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops: expected a positive int, got {num_crops!r}")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
        raise ValueError(f"crop_size: expected a positive int, got {crop_size!r}")
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds):
        raise ValueError(f"seed: expected a non-negative int or a sequence of them, got {seed!r}")
    seeds = [int(s) for s in seeds]
    try:
        low, high = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise ValueError(f"scale_range: expected (low, high) with 0 < low <= high <= 1, got {scale_range!r}") from None
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale_range: expected (low, high) with 0 < low <= high <= 1, got {scale_range!r}")
    photos = [(name, photo) for name, photo in _natural_photos() if min(photo.size) >= crop_size]
    if not photos:
        raise FileNotFoundError(
            f"no bundled photograph of at least {crop_size}x{crop_size} pixels found; install scikit-image and "
            f"scikit-learn (`pip install -e .[data]`), whose wheels ship them"
        )

    rng = np.random.default_rng(seeds)
    png, labels = [], np.empty(num_crops, dtype=np.int64)
    for i in range(num_crops):
        source = int(rng.integers(len(photos)))
        scale = math.exp(rng.uniform(math.log(low), math.log(high)))
        u, v = rng.random(2)
        photo = photos[source][1]
        width, height = photo.size
        side = min(crop_size / scale, width, height)
        x0, y0 = u * (width - side), v * (height - side)
        crop = photo.resize((crop_size, crop_size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        png.append(_png_bytes(np.asarray(crop)))
        labels[i] = source
    names = [name for name, _ in photos]
    fingerprint = _fingerprint("natural_crops", _CACHE_VERSION, num_crops, crop_size, seeds, (low, high), names)
    return _image_dataset(png, labels, names, fingerprint)


# ==============================================================================================
# One entry point
# ==============================================================================================

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for the duration, whatever the environment said.

    ``datasets`` reads the environment variable once, at import, into ``datasets.config.HF_HUB_OFFLINE``
    and consults that flag at call time, so the flag (restored afterwards) is what must change. Offline,
    ``load_dataset`` reads only local files and the local cache, and skips its download-count ping.
    """
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is not None:
        if split not in loaded:
            raise ValueError(f"split: {source} has splits {list(loaded)}, got {split!r}")
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if "train" in loaded:
        return loaded["train"]
    raise ValueError(f"split: {source} has several splits {list(loaded)} and none is 'train'; pass split=")


def _standardise_columns(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Rename the image column to ``image`` and a lone ``ClassLabel`` column to ``label`` (e.g. CIFAR's ``img``)."""
    features = dataset.features
    if "image" not in features:
        image_columns = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        if not image_columns:
            raise ValueError(f"{source}: expected an image column (datasets.Image feature), got features {features}")
        dataset = dataset.rename_column(image_columns[0], "image")
    if "label" not in features:
        label_columns = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(label_columns) == 1:
            dataset = dataset.rename_column(label_columns[0], "label")
    return dataset


def _hub_cache_entry(name: str, cache_dir: str | os.PathLike | None) -> Path:
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return Path(os.path.expanduser(str(cache_dir or datasets.config.HF_DATASETS_CACHE))) / "___".join(parts)


def load_image_dataset(
    spec: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    split: str | None = None,
    *,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    config_name: str | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """Load images as a ``Dataset`` with an ``image`` column (and ``label`` where known), from ``spec``:

    - ``"fashion_mnist"`` -> :func:`load_fashion_mnist` (``split`` defaults to ``"train"``; ``root=`` in kwargs);
    - ``"natural_crops"`` -> :func:`load_natural_crops` (kwargs: ``num_crops`` (default 10,000), ``crop_size``,
      ``seed``, ``scale_range``). ``split="test"`` / ``"validation"`` draw the crops from an independent
      random stream (``[seed, 1]`` / ``[seed, 2]``): other crops of the *same* photographs, not held-out ones;
    - a ``save_to_disk`` directory -> ``datasets.load_from_disk``;
    - any other directory -> ``load_dataset("imagefolder", data_dir=spec)``: labels from the sub-folder
      names. Files are not opened here, so a corrupt one costs nothing until :class:`ImageTransformDataset`
      skips it;
    - ``"namespace/name"`` -> a Hugging Face dataset that must already be in the local datasets cache
      (``cache_dir`` or ``$HF_DATASETS_CACHE``); it is read offline, never downloaded;
    - a ``Dataset`` / ``DatasetDict`` -> used as is.

    ``split=None`` picks the only split, else ``"train"``. ``limit`` keeps the first rows. ``cache_dir`` is
    where built data sets live (ours for Fashion-MNIST, ``datasets``' for image folders and the Hub).
    """
    if isinstance(spec, (datasets.Dataset, datasets.DatasetDict)):
        if kwargs:
            raise TypeError(f"load_image_dataset: unexpected argument(s) {sorted(kwargs)} for an in-memory dataset")
        return _limit(_standardise_columns(_pick_split(spec, split, "the dataset"), "the dataset"), limit)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec: expected a path, a dataset name or a datasets.Dataset, got {type(spec).__name__}")
    spec_str = os.fspath(spec)

    if spec_str in ("fashion_mnist", "fashion-mnist"):
        return load_fashion_mnist(split or "train", limit=limit, cache_dir=cache_dir, **kwargs)
    if spec_str in ("natural_crops", "natural-crops"):
        streams = {None: None, "train": None, "test": 1, "validation": 2}
        if split not in streams:
            raise ValueError(f"split: natural_crops has splits 'train', 'test' and 'validation', got {split!r}")
        kwargs.setdefault("num_crops", 10_000)
        if streams[split] is not None:
            kwargs["seed"] = [kwargs.get("seed", 0), streams[split]]
        return _limit(load_natural_crops(**kwargs), limit)
    if kwargs:
        raise TypeError(f"load_image_dataset: unexpected argument(s) {sorted(kwargs)} for {spec_str!r}")

    path = Path(spec_str).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            source = f"the saved dataset {path}"
        else:
            with _hub_offline():
                loaded = datasets.load_dataset(
                    "imagefolder", data_dir=str(path), cache_dir=None if cache_dir is None else str(cache_dir)
                )
            source = f"the image folder {path}"
        return _limit(_standardise_columns(_pick_split(loaded, split, source), source), limit)

    if not _HUB_NAME.match(spec_str):
        raise FileNotFoundError(f"spec: no such directory {spec_str!r} (and it is not a dataset name)")
    entry = _hub_cache_entry(spec_str, cache_dir)
    if not any(p.is_dir() for p in entry.glob("*/*/*")):
        raise FileNotFoundError(
            f"spec: {spec_str!r} is neither a local directory nor a Hugging Face dataset in the local cache "
            f"(looked for {entry}). Nothing is downloaded at run time: fetch it beforehand on a machine with "
            f"network access, with the same cache, e.g. `python -c \"import datasets; "
            f"datasets.load_dataset('{spec_str}')\"` (set HF_DATASETS_CACHE or pass cache_dir= to choose "
            f"where), or save it with Dataset.save_to_disk(DIR) and pass DIR."
        )
    with _hub_offline():
        loaded = datasets.load_dataset(
            spec_str, config_name, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    source = f"the Hugging Face dataset {spec_str!r}"
    return _limit(_standardise_columns(_pick_split(loaded, split, source), source), limit)


# ==============================================================================================
# Decoding, skipping and counting bad images
# ==============================================================================================

class ImageDecodeError(ValueError):
    """An image that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


SKIP_REASONS = (
    "missing",  # the row holds no image
    "empty_file",  # zero bytes
    "unreadable",  # the file cannot be opened (gone, permissions)
    "not_an_image",  # PIL does not recognise the bytes (e.g. text named .jpg)
    "truncated",  # the file ends before the image does
    "corrupt",  # recognised, but decoding failed
    "too_large",  # above PIL's decompression-bomb limit
    "unusable",  # decoded, but the image processor rejected it (e.g. 1 pixel wide)
    "unknown",  # a dataset returned None without saying why
)


def _open_image(data: bytes, where: str) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty_file", f"{where} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", f"{where} is not in an image format PIL recognises") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_large", f"{where}: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
        raise ImageDecodeError(reason, f"{where}: {type(err).__name__}: {err}") from err
    return image


def decode_image(value: Any) -> Any:
    """Turn one value of an image column into something :class:`AdaTokImageProcessor` accepts.

    ``value`` is what a ``datasets.Image(decode=False)`` column holds (``{"bytes": ..., "path": ...}``), a
    path, raw bytes, an already decoded PIL image, or an array. Raises :class:`ImageDecodeError` (a
    ``ValueError``) with a ``reason`` from :data:`SKIP_REASONS` instead of PIL's assorted exceptions.
    """
    if value is None:
        raise ImageDecodeError("missing", "the row holds no image")
    if isinstance(value, Image.Image):
        try:
            value.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
            raise ImageDecodeError(reason, f"{type(err).__name__}: {err}") from err
        return value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    if isinstance(value, list):
        return np.asarray(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_image(bytes(value), "the image bytes")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _open_image(value["bytes"], value.get("path") or "the image bytes")
        value = value.get("path")
        if value is None:
            raise ImageDecodeError("missing", "the row's image has neither bytes nor a path")
    if isinstance(value, (str, os.PathLike)):
        try:
            data = Path(value).read_bytes()
        except OSError as err:
            raise ImageDecodeError("unreadable", f"{value}: {type(err).__name__}: {err}") from err
        return _open_image(data, str(value))
    raise ImageDecodeError("corrupt", f"unsupported image value of type {type(value).__name__}")


class SkippedImage(NamedTuple):
    """What :class:`ImageTransformDataset` returns for an item it cannot use (instead of a bare ``None``,
    so the reason travels with it through DataLoader worker processes to :func:`collate_images`)."""

    index: int
    reason: str
    detail: str


class SkipCounter:
    """Adds up skipped images by reason, from batches made by :func:`collate_images`.

    Counts come from the batches, not from the dataset object, because with ``num_workers > 0`` each
    worker holds its own copy of the dataset. Per process; in distributed runs each rank counts its share.
    """

    max_examples = 5  # per reason, for the summary

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, count: int = 1, example: str | None = None) -> None:
        self.counts[reason] += count
        if example is not None and len(self.examples.setdefault(reason, [])) < self.max_examples:
            self.examples[reason].append(example)

    def update(self, batch: dict) -> int:
        """Add a batch's ``"skipped"`` counts (and examples); returns how many it skipped."""
        for reason, count in batch.get("skipped", {}).items():
            self.add(reason, int(count))
        for reason, example in batch.get("skipped_examples", ()):
            if len(self.examples.setdefault(reason, [])) < self.max_examples:
                self.examples[reason].append(example)
        return int(batch.get("num_skipped", 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted((reason, count) for reason, count in self.counts.items() if count))

    def summary(self) -> str:
        if not self.total:
            return "skipped images: none"
        by_reason = ", ".join(f"{reason}={count}" for reason, count in self.as_dict().items())
        examples = "; ".join(e for reason in self.as_dict() for e in self.examples.get(reason, [])[:1])
        return f"skipped images: {self.total} ({by_reason})" + (f"; e.g. {examples}" if examples else "")

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


# ==============================================================================================
# Torch side: per-item processing, collation, loader
# ==============================================================================================

class ImageTransformDataset(torch.utils.data.Dataset):
    """A torch view of a Hugging Face image dataset that decodes and processes one item at a time.

    ``dataset[i]`` -> ``{"pixel_values": FloatTensor[3, S, S] in [0, 1], "label": int}`` (``label`` is -1
    when the dataset has no ``label_column``), or a :class:`SkippedImage` when the image cannot be
    decoded or processed. The image column is read with ``decode=False`` and decoded here by
    :func:`decode_image`, so a corrupt file never raises inside ``datasets``.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_processor: Any,
        image_column: str = "image",
        label_column: str | None = "label",
    ) -> None:
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset: expected a datasets.Dataset, got {type(dataset).__name__}")
        if image_column not in dataset.column_names:
            raise ValueError(
                f"image_column: {image_column!r} is not a column of the dataset; columns: {dataset.column_names}"
            )
        if not callable(image_processor):
            raise TypeError(f"image_processor: expected an AdaTokImageProcessor, got {type(image_processor).__name__}")
        self.has_labels = label_column is not None and label_column in dataset.column_names
        columns = [image_column] + ([label_column] if self.has_labels else [])
        dataset = dataset.select_columns(columns)
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_processor = dataset, image_processor
        self.image_column, self.label_column = image_column, label_column
        label_feature = dataset.features.get(label_column) if self.has_labels else None
        self.class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | SkippedImage:
        index = int(index)
        row = self.dataset[index]
        value = row[self.image_column]
        path = value.get("path") if isinstance(value, dict) else None
        try:
            image = decode_image(value)
        except ImageDecodeError as err:  # the detail names the file when there is one
            if err.reason == "unreadable" and path is not None and not Path(path).parent.is_dir():
                # One vanished file is skipped; a vanished folder means the data set itself is gone.
                raise FileNotFoundError(
                    f"the data set disappeared mid-epoch: the folder {Path(path).parent} of item {index} ({path}) no "
                    f"longer exists (unmounted or deleted?); single missing files are skipped, a missing folder stops"
                ) from err
            return SkippedImage(index, err.reason, err.detail)
        try:
            pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
        except ValueError as err:  # content the processor cannot use; a TypeError is a bug and propagates
            return SkippedImage(index, "unusable", f"{path or 'the image'}: {err}")
        label = row[self.label_column] if self.has_labels else -1
        return {"pixel_values": pixel_values, "label": -1 if label is None else int(label)}


def collate_images(items: list[dict | SkippedImage | None]) -> dict[str, Any]:
    """Stack the good items, drop the skipped ones, and say what was dropped.

    Returns ``{"pixel_values": [B, 3, S, S], "labels": LongTensor[B], "num_skipped": int,
    "skipped": {reason: count}, "skipped_examples": [(reason, text)]}``. ``B`` is 0 (and
    ``pixel_values`` is ``[0, 3, 0, 0]``) when every item of the batch was bad: skip such a step.
    """
    good, skipped = [], []
    for item in items:
        if isinstance(item, SkippedImage):
            skipped.append(item)
        elif item is None:
            skipped.append(SkippedImage(-1, "unknown", "the dataset returned None"))
        elif isinstance(item, dict):
            good.append(item)
        else:
            raise TypeError(f"items: expected dicts or SkippedImage, got {type(item).__name__}")
    if good:
        pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in good])
        labels = torch.tensor([int(item["label"]) for item in good], dtype=torch.long)
    else:
        pixel_values, labels = torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long)
    return {
        "pixel_values": pixel_values,
        "labels": labels,
        "num_skipped": len(skipped),
        "skipped": dict(Counter(item.reason for item in skipped)),
        "skipped_examples": [(item.reason, f"item {item.index}: {item.detail}") for item in skipped],
    }


class ImageDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch`` (forwarded to its sampler, which reshuffles from ``seed + epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(epoch))


def _world(distributed: bool | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size() > 1
    if not distributed:
        return 0, 1
    if not initialised:
        raise ValueError("distributed: True needs torch.distributed to be initialised first (init_process_group)")
    return dist.get_rank(), dist.get_world_size()


def build_dataloader(
    dataset: datasets.Dataset | torch.utils.data.Dataset,
    image_processor: Any = None,
    batch_size: int = 32,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool | None = None,
) -> ImageDataLoader:
    """A DataLoader over images, batches as in :func:`collate_images`.

    Args:
        dataset: a ``datasets.Dataset`` with an ``image`` column (wrapped in :class:`ImageTransformDataset`
            with ``image_processor``), or a torch dataset whose items are already such dicts.
        batch_size: images per batch on this rank (before skipped ones are dropped).
        shuffle: shuffle with ``seed + epoch`` (call ``loader.set_epoch(epoch)`` each epoch).
        num_workers: worker processes (kept alive between epochs); their random augmentations are seeded
            from ``seed`` through the loader's generator.
        drop_last: drop the last incomplete batch (and, across ranks, the uneven tail).
        distributed: shard with a ``DistributedSampler`` over torch.distributed's ranks; ``None`` does so
            when a process group with more than one rank is initialised. Pass ``False`` when a wrapper
            (e.g. ``accelerate.prepare``) shards the loader itself.

    ``pin_memory`` is on only when CUDA is available.
    """
    if isinstance(dataset, datasets.Dataset):
        if image_processor is None:
            raise ValueError("image_processor: required to turn a datasets.Dataset into pixel_values, got None")
        dataset = ImageTransformDataset(dataset, image_processor)
    elif image_processor is not None:
        raise ValueError(
            f"image_processor: only used with a datasets.Dataset; {type(dataset).__name__} applies its own processing"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one item, got an empty dataset")
    rank, world_size = _world(distributed)
    # One sampler for every case: with one replica it is a seeded, epoch-aware (or sequential) permutation.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return ImageDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
