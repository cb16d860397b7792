"""Image data for AdaTok training: one path through Hugging Face ``datasets``.

Every loader returns a :class:`datasets.Dataset` with an ``image`` column (``datasets.Image()``, PIL on
access) and, where classes are known, a ``label`` column (``ClassLabel`` with names):

- :func:`load_fashion_mnist` -- the IDX files of Debian's ``dataset-fashion-mnist`` (28x28 grey), parsed
  here with numpy and cached with ``save_to_disk`` so later loads are memory-mapped and instant;
- :func:`load_natural_crops` -- multi-scale random crops of the colour photographs bundled inside
  scikit-image and scikit-learn (read from the installed package folders; nothing is fetched);
- :func:`load_image_dataset` -- one entry point for those two, an image folder, a ``save_to_disk``
  directory, a Hugging Face dataset already in the local cache (never downloaded here), an ImageNet-layout
  folder, webdataset tar shards, and any of these streamed (``streaming=True``).

At scale (``data_sources.py``, re-exported here): ImageNet layouts and label files, webdataset shards,
streams split across ranks and workers, and the preload decision (:func:`decide_preload`). The field's
natural-image transforms (random crop + flip for training, ADM centre crop for evaluation) are
:class:`NaturalImageTransform` (``data_transforms.py``). Decoded images are turned upright by their EXIF
orientation (``decode_upright`` of the image processor).

Training reads them through (``data_loading.py``, re-exported here) :class:`ImageTransformDataset`
(decodes each image itself and applies an :class:`~adatok_vlm.AdaTokImageProcessor`),
:func:`collate_images` and :func:`build_dataloader`. A corrupt
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

import gzip
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .data_common import (CACHE_VERSION, HUB_NAME, check_limit, default_cache_dir, fingerprint, hub_offline,
                          image_dataset, limit_rows, png_bytes, save_atomically, standardise_columns)
from .data_sources import is_imagenet_layout, is_shard_spec, load_imagenet_folder, load_webdataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "NATURAL_PHOTOS",
    "SKIP_REASONS",
    "ImageDataLoader",
    "EpochTaggedBatchSampler",
    "ImageDecodeError",
    "ImageTransformDataset",
    "SkipCounter",
    "SkippedImage",
    "build_dataloader",
    "build_stream_loader",
    "collate_images",
    "decide_preload",
    "decoded_size_gb",
    "default_num_workers",
    "expand_shard_pattern",
    "load_imagenet_folder",
    "load_streaming",
    "load_webdataset",
    "process_item",
    "read_label_file",
    "shard_stream",
    "rank_and_world_size",
    "NaturalImageTransform",
    "StreamingImageDataset",
    "adm_center_crop",
    "decode_image",
    "default_cache_dir",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_natural_crops",
    "natural_photo_paths",
    "read_idx",
]

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
    key = fingerprint("fashion_mnist", CACHE_VERSION, split, stats)

    cache_path = None
    if cache_dir is not False:
        root_dir = Path(default_cache_dir() if cache_dir in (None, True) else cache_dir)
        cache_path = root_dir / f"fashion_mnist-{split}-{key}"
        if cache_path.is_dir():
            try:
                return limit_rows(datasets.load_from_disk(str(cache_path)), limit)
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
    png = [png_bytes(a) for a in images]
    if limit is not None:
        return image_dataset(png, labels, FASHION_MNIST_CLASSES, f"{key}-{len(images)}")
    dataset = image_dataset(png, labels, FASHION_MNIST_CLASSES, key)
    if cache_path is None:
        return dataset
    save_atomically(dataset, cache_path)
    return datasets.load_from_disk(str(cache_path))  # memory-mapped: cheap to share with workers


# ==============================================================================================
# Natural colour photographs (bundled with scikit-image/scikit-learn, and Debian wallpapers)
# ==============================================================================================

# They live in natural_images.py (the held-out-photo data set is built there too); re-exported here so
# `from adatok_vlm.training.data import load_natural_crops` keeps working.
from .natural_images import NATURAL_PHOTOS, load_natural_crops, load_natural_images, natural_photo_paths  # noqa: E402


# ==============================================================================================
# One entry point
# ==============================================================================================

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
    streaming: bool | None = None,
    label_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load images as a ``Dataset`` with an ``image`` column (and ``label`` where known), from ``spec``:

    - ``"fashion_mnist"`` -> :func:`load_fashion_mnist` (``split`` defaults to ``"train"``; ``root=`` in kwargs);
    - ``"natural_crops"`` -> :func:`load_natural_crops` (kwargs: ``num_crops`` (default 10,000), ``crop_size``,
      ``seed``, ``scale_range``). ``split="test"`` / ``"validation"`` draw the crops from an independent
      random stream (``[seed, 1]`` / ``[seed, 2]``): other crops of the *same* photographs, not held-out ones;
    - a ``save_to_disk`` directory -> ``datasets.load_from_disk``;
    - an ImageNet-layout directory (``train/<wnid>/``, ``val/`` in class folders or flat with a label file;
      ``label_file=`` names one) -> :func:`~adatok_vlm.training.data_sources.load_imagenet_folder`;
    - webdataset tar shards (a brace pattern, a glob, a ``.tar`` or a folder of them) ->
      :func:`~adatok_vlm.training.data_sources.load_webdataset`, streamed unless ``streaming=False``;
    - any other directory -> ``load_dataset("imagefolder", data_dir=spec)``: labels from the sub-folder
      names. Files are not opened here, so a corrupt one costs nothing until :class:`ImageTransformDataset`
      skips it;
    - ``"namespace/name"`` -> a Hugging Face dataset that must already be in the local datasets cache
      (``cache_dir`` or ``$HF_DATASETS_CACHE``); it is read offline, never downloaded;
    - a ``Dataset`` / ``DatasetDict`` -> used as is.

    ``split=None`` picks the only split, else ``"train"``. ``limit`` keeps the first rows (a positive int;
    0 is an error, not "no limit"). ``cache_dir`` is where built data sets live (ours for Fashion-MNIST,
    ``datasets``' for image folders and the Hub). ``streaming=True`` returns a ``datasets.IterableDataset``
    (:func:`load_streaming`; a hub name is then read over the network);
    ``None`` streams tar shards only.
    """
    limit = check_limit(limit)
    if streaming is not None and not isinstance(streaming, bool):
        raise TypeError(f"streaming: expected True, False or None, got {streaming!r}")
    shards = isinstance(spec, (str, os.PathLike)) and is_shard_spec(spec)
    if shards:
        if kwargs or label_file is not None:
            raise TypeError(f"load_image_dataset: unexpected argument(s) {sorted(kwargs) or ['label_file']} for shards")
        return load_webdataset(spec, streaming=streaming is not False, limit=limit, cache_dir=cache_dir)
    if streaming:
        if label_file is not None:
            kwargs["label_file"] = label_file
        return load_streaming(spec, split, limit=limit, cache_dir=cache_dir, config_name=config_name, **kwargs)
    if isinstance(spec, (datasets.Dataset, datasets.DatasetDict)):
        if kwargs:
            raise TypeError(f"load_image_dataset: unexpected argument(s) {sorted(kwargs)} for an in-memory dataset")
        return limit_rows(standardise_columns(_pick_split(spec, split, "the dataset"), "the dataset"), limit)
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
        return limit_rows(load_natural_crops(**kwargs), limit)
    if spec_str in ("natural_images", "natural-images"):   # whole photos held out: train and test share none
        return limit_rows(load_natural_images(split or "train", **kwargs), limit)
    if kwargs:
        raise TypeError(f"load_image_dataset: unexpected argument(s) {sorted(kwargs)} for {spec_str!r}")

    path = Path(spec_str).expanduser()
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if path.is_dir() and not saved and is_imagenet_layout(path):
        return load_imagenet_folder(path, split or "train", label_file=label_file, limit=limit)
    if label_file is not None:
        raise ValueError(f"label_file: only used with an ImageNet-layout folder (train/, val/), not {spec_str!r}")
    if path.is_dir():
        if saved:
            loaded = datasets.load_from_disk(str(path))
            source = f"the saved dataset {path}"
        else:
            with hub_offline():
                loaded = datasets.load_dataset(
                    "imagefolder", data_dir=str(path), cache_dir=None if cache_dir is None else str(cache_dir)
                )
            source = f"the image folder {path}"
        return limit_rows(standardise_columns(_pick_split(loaded, split, source), source), limit)

    if not HUB_NAME.match(spec_str):
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
    with hub_offline():
        loaded = datasets.load_dataset(
            spec_str, config_name, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    source = f"the Hugging Face dataset {spec_str!r}"
    return limit_rows(standardise_columns(_pick_split(loaded, split, source), source), limit)


def load_streaming(
    spec: str | os.PathLike | datasets.Dataset,
    split: str | None = None,
    *,
    num_shards: int | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> datasets.IterableDataset:
    """``spec`` as a ``datasets.IterableDataset`` with ``image`` (and ``label``) columns.

    - tar shards -> :func:`~adatok_vlm.training.data_sources.load_webdataset` (one stream shard per tar);
    - a folder of ``.parquet`` files (or a ``<split>/`` of them) -> the ``parquet`` builder, streamed;
    - a hub name that is not a local path -> ``load_dataset(name, split=..., streaming=True)``: this is the
      one loader that uses the network at run time, because streaming from the hub is what was asked for;
    - anything else :func:`load_image_dataset` reads (an ImageNet folder, an image folder, a
      ``save_to_disk`` directory, a ``Dataset``) -> loaded map-style (paths only, not decoded), then
      ``to_iterable_dataset(num_shards)`` (default: ``min(len, 64)`` shards, so ranks and workers can
      split it).
    """
    limit = check_limit(limit)
    if isinstance(spec, (str, os.PathLike)) and is_shard_spec(spec):
        return load_webdataset(spec, streaming=True, limit=limit, cache_dir=cache_dir)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        parquet_dir = path / split if split and (path / split).is_dir() else path
        parquet = sorted(str(p) for p in parquet_dir.glob("*.parquet")) if parquet_dir.is_dir() else []
        if parquet:
            with hub_offline():
                loaded = datasets.load_dataset("parquet", data_files={"train": parquet}, split="train",
                                               streaming=True, cache_dir=None if cache_dir is None else str(cache_dir))
            loaded = standardise_columns(loaded, f"the parquet files in {parquet_dir}")
            return loaded.take(limit) if limit is not None else loaded
        name = os.fspath(spec)
        built_in = name in ("fashion_mnist", "fashion-mnist", "natural_crops", "natural-crops")  # load_image_dataset's
        if not built_in and not path.exists() and HUB_NAME.match(name) and not name.startswith((".", "/", "~")):
            loaded = datasets.load_dataset(name, kwargs.pop("config_name", None), split=split or "train",
                                           streaming=True, cache_dir=None if cache_dir is None else str(cache_dir))
            if kwargs:
                raise TypeError(f"load_streaming: unexpected argument(s) {sorted(kwargs)} for {spec!r}")
            loaded = standardise_columns(loaded, f"the Hugging Face dataset {spec!r}")
            return loaded.take(limit) if limit is not None else loaded
    mapped = load_image_dataset(spec, split, limit=limit, cache_dir=cache_dir, **kwargs)
    if num_shards is None:
        num_shards = max(1, min(len(mapped), 64))
    return mapped.to_iterable_dataset(num_shards=num_shards)


# ==============================================================================================
# Decoding, skipping, torch batches: in data_loading.py, re-exported here
# ==============================================================================================

from .data_loading import (  # noqa: E402
    SKIP_REASONS,
    EpochTaggedBatchSampler,
    ImageDataLoader,
    ImageDecodeError,
    ImageTransformDataset,
    SkipCounter,
    SkippedImage,
    build_dataloader,
    collate_images,
    decode_image,
    process_item,
    rank_and_world_size,
)


# Scale (ImageNet layouts, shards, streams, the preload decision) and natural-image transforms live in their
# own modules; re-exported so ``from adatok_vlm.training.data import ...`` serves every data name.
from .data_sources import (  # noqa: E402
    StreamingImageDataset,
    build_stream_loader,
    decide_preload,
    decoded_size_gb,
    default_num_workers,
    expand_shard_pattern,
    read_label_file,
    shard_stream,
)
from .data_transforms import NaturalImageTransform, adm_center_crop  # noqa: E402
