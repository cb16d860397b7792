"""Decoding images, skipping the unusable ones, and turning a data set into torch batches.

- :func:`decode_image` turns any image-column value into a PIL image (upright by its EXIF orientation,
  the image processor's ``decode_upright``) or raises :class:`ImageDecodeError` with a reason from :data:`SKIP_REASONS`;
- :class:`ImageTransformDataset` (map-style) and :func:`process_item` (shared with streams) decode and
  process one item, returning a :class:`SkippedImage` instead of failing; :func:`collate_images` drops
  those and reports them inside the batch; :class:`SkipCounter` adds the reports up;
- :func:`build_dataloader` and :class:`EpochTaggedBatchSampler` shard, shuffle and seed per epoch.

Split out of ``data.py`` (which re-exports every name here) so that file keeps to the sources.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, DistributedSampler

from ..tokenizer.image_processing_adatok import decode_upright

__all__ = [
    "SKIP_REASONS",
    "EpochTaggedBatchSampler",
    "ImageDataLoader",
    "ImageDecodeError",
    "ImageTransformDataset",
    "SkipCounter",
    "SkippedImage",
    "build_dataloader",
    "collate_images",
    "decode_image",
    "process_item",
    "rank_and_world_size",
]


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
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", f"{where} is not in an image format PIL recognises") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_large", f"{where}: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
        raise ImageDecodeError(reason, f"{where}: {type(err).__name__}: {err}") from err
    return _upright(image, where)


def _upright(image: Image.Image, where: str) -> Image.Image:
    """Decode ``image`` and turn it upright by its EXIF orientation (``decode_upright``, the image
    processor's rule, so training and inference see a photo the same way up); a failure is an
    :class:`ImageDecodeError` (``truncated`` or ``corrupt``) so the item is skipped and counted."""
    try:
        return decode_upright(image, where)
    except ValueError as err:
        reason = "truncated" if "truncat" in str(err).lower() else "corrupt"
        raise ImageDecodeError(reason, str(err)) from None


def decode_image(value: Any) -> Any:
    """Turn one value of an image column into something :class:`AdaTokImageProcessor` accepts.

    ``value`` is what a ``datasets.Image(decode=False)`` column holds (``{"bytes": ..., "path": ...}``), a
    path, raw bytes, an already decoded PIL image, or an array. Raises :class:`ImageDecodeError` (a
    ``ValueError``) with a ``reason`` from :data:`SKIP_REASONS` instead of PIL's assorted exceptions.
    """
    if value is None:
        raise ImageDecodeError("missing", "the row holds no image")
    if isinstance(value, Image.Image):
        return _upright(value, "the image")
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

def process_item(value: Any, image_processor: Any, *, key: Any, epoch: int, label: int, index: int) -> dict | SkippedImage:
    """Decode one image-column value and process it: ``{"pixel_values": [3, S, S], "label", "key"}``, or a
    :class:`SkippedImage` saying why not. A processor with a ``transform(image, key, epoch)`` method (a
    :class:`~adatok_vlm.training.data_transforms.NaturalImageTransform`) is seeded per item by ``key`` and
    ``epoch``; an :class:`~adatok_vlm.AdaTokImageProcessor` is called as usual."""
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
        if hasattr(image_processor, "transform"):
            pixel_values = image_processor.transform(image, key=key, epoch=epoch)
        else:
            pixel_values = image_processor(image, return_tensors="pt")["pixel_values"][0]
    except ValueError as err:  # content the processor cannot use; a TypeError is a bug and propagates
        return SkippedImage(index, "unusable", f"{path or 'the image'}: {err}")
    return {"pixel_values": pixel_values, "label": label, "key": key}


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

    def __getitem__(self, index: int | tuple[int, int]) -> dict | SkippedImage:
        """``index``, or ``(epoch, index)`` as :func:`build_dataloader` samples for a seeded transform."""
        epoch, index = (int(index[0]), int(index[1])) if isinstance(index, (tuple, list)) else (0, int(index))
        row = self.dataset[index]
        label = row[self.label_column] if self.has_labels else -1
        return process_item(row[self.image_column], self.image_processor, key=index, epoch=epoch,
                            label=-1 if label is None else int(label), index=index)


def collate_images(items: list[dict | SkippedImage | None]) -> dict[str, Any]:
    """Stack the good items, drop the skipped ones, and say what was dropped.

    Returns ``{"pixel_values": [B, 3, S, S], "labels": LongTensor[B], "keys": [B item keys (index or
    webdataset __key__)], "num_skipped": int, "skipped": {reason: count}, "skipped_examples":
    [(reason, text)]}``. ``B`` is 0 (and
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
        "keys": [item.get("key") for item in good],
        "num_skipped": len(skipped),
        "skipped": dict(Counter(item.reason for item in skipped)),
        "skipped_examples": [(item.reason, f"item {item.index}: {item.detail}") for item in skipped],
    }


class ImageDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch`` (forwarded to its sampler, which reshuffles from ``seed + epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(epoch))


class _EpochTaggedSampler(DistributedSampler):
    """A ``DistributedSampler`` yielding ``(epoch, index)``, so a seeded per-item transform draws from
    ``(seed, epoch, index)`` in whichever worker decodes the item (workers are persistent and never see
    ``set_epoch`` themselves)."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in super().__iter__())


class EpochTaggedBatchSampler(torch.utils.data.Sampler):
    """Wraps a batch sampler with an ``epoch`` attribute (e.g. ``batches.ResumableBatchSampler``) so each
    batch is ``[(epoch, index), ...]``: :class:`ImageTransformDataset` then seeds a per-item transform by
    ``(seed, epoch, index)``, giving new crops every epoch and the same ones on resume. Other attributes
    (``set_position``, ``epoch``, ...) are the wrapped sampler's."""

    def __init__(self, batch_sampler: Any) -> None:
        if not hasattr(batch_sampler, "epoch"):
            raise TypeError(f"batch_sampler: expected a sampler with an epoch attribute, got {type(batch_sampler).__name__}")
        self.batch_sampler = batch_sampler

    def __getattr__(self, name: str) -> Any:
        if name == "batch_sampler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = int(self.batch_sampler.epoch)
        for batch in self.batch_sampler:
            yield [(epoch, int(i)) for i in batch]


def rank_and_world_size(distributed: bool | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` for sharding data: the initialised ``torch.distributed`` group's when
    ``distributed`` is True (or None and a group of more than one rank exists), else ``(0, 1)``; True
    without an initialised group is a ValueError. Public so that metrics shard the way loaders do."""
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
    rank: int | None = None,
    world_size: int | None = None,
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
        rank, world_size: this process's shard, given explicitly (both or neither); they override
            ``distributed``. Ranks read disjoint items, together all of them (padded by repetition to equal
            counts unless ``drop_last``), each rank's share split among its workers by the sampler.

    ``pin_memory`` is on only when CUDA is available. With a per-item seeded transform
    (:class:`~adatok_vlm.training.data_transforms.NaturalImageTransform`) the sampler also passes the epoch.
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
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank, world_size: give both or neither, got rank={rank!r}, world_size={world_size!r}")
    if rank is None:
        rank, world_size = rank_and_world_size(distributed)
    elif (isinstance(rank, bool) or isinstance(world_size, bool) or not isinstance(rank, int)
          or not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size):
        raise ValueError(f"rank, world_size: expected ints with 0 <= rank < world_size, got {rank!r}, {world_size!r}")
    seeded = isinstance(dataset, ImageTransformDataset) and hasattr(dataset.image_processor, "transform")
    # One sampler for every case: with one replica it is a seeded, epoch-aware (or sequential) permutation.
    sampler = (_EpochTaggedSampler if seeded else DistributedSampler)(
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
