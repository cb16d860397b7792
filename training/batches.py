"""Deterministic, resumable batching, and in-memory preloading of small image sets.

* :class:`ResumableBatchSampler` draws a fresh permutation per epoch from ``seed + epoch``, shards it
  across ranks and can start mid-epoch, so ``--resume`` continues with exactly the batches an
  uninterrupted run would have seen.
* :func:`preload_images` runs the image processor over a whole (small) data set once and keeps the
  result as a uint8 tensor, cached on disk by the data set's fingerprint: Fashion-MNIST then costs
  nothing per step, which is what makes CPU training practical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; epoch ``e`` uses ``randperm(n, seed + e)``, rank ``r`` takes ``perm[r::world]``.

    ``set_position(epoch, batch)`` makes the next iteration start at that batch of that epoch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"{num_items} items cannot fill one batch of {batch_size} on each of {world_size} ranks")

    def __len__(self) -> int:
        per_rank = self.num_items // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(batch)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            perm = torch.arange(self.num_items)
        usable = (self.num_items // self.world_size) * self.world_size
        return perm[:usable][self.rank :: self.world_size]

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size].tolist()
        self.start_batch = 0


class PreloadedImages(Dataset):
    """``pixels`` uint8 ``[N, 3, H, W]`` and ``labels`` ``[N]`` as a map-style data set of dicts."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None = None):
        self.pixels = pixels
        self.labels = labels if labels is not None else torch.full((pixels.shape[0],), -1, dtype=torch.long)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, idx: int) -> dict:
        return {"pixel_values": self.pixels[idx], "label": self.labels[idx]}

    def batch(self, indices: list[int]) -> dict:
        """Fast path: gather a whole batch at once, as float in [0, 1]."""
        idx = torch.as_tensor(indices)
        return {"pixel_values": self.pixels[idx].float().div_(255.0), "labels": self.labels[idx]}


def collate_preloaded(items: list[dict]) -> dict:
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]).float().div_(255.0),
            "labels": torch.stack([torch.as_tensor(i["label"]) for i in items])}


def _cache_dir() -> Path:
    root = os.environ.get("ADATOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adatok-vlm")
    return Path(root) / "preload"


def preload_images(dataset, image_processor, chunk_size: int = 2048, cache: bool = True,
                   image_column: str = "image", label_column: str = "label") -> PreloadedImages:
    """Process every image of a Hugging Face data set once into a uint8 tensor (cached on disk).

    Unreadable images are skipped and counted (``result.num_skipped``).
    """
    key = None
    fingerprint = getattr(dataset, "_fingerprint", None)
    if cache and fingerprint:
        proc = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
        key = hashlib.sha256(f"{fingerprint}|{len(dataset)}|{proc}".encode()).hexdigest()[:24]
        file = _cache_dir() / f"{key}.safetensors"
        if file.is_file():
            tensors = load_file(str(file))
            out = PreloadedImages(tensors["pixels"], tensors["labels"])
            out.num_skipped = int(tensors["num_skipped"])
            return out
    import datasets

    from .data import decode_image

    pixels, labels, skipped = [], [], 0
    has_labels = label_column in dataset.column_names
    raw = dataset
    if isinstance(dataset.features.get(image_column), datasets.Image):
        # Decode ourselves so one corrupt file is skipped and counted instead of failing the slice.
        raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    for start in tqdm(range(0, len(raw), chunk_size), desc="preprocessing images", leave=False):
        rows = raw[start : start + chunk_size]
        good_images, good_labels = [], []
        for i, value in enumerate(rows[image_column]):
            try:
                good_images.append(decode_image(value))
            except (ValueError, OSError):
                skipped += 1
                continue
            good_labels.append(int(rows[label_column][i]) if has_labels else -1)
        if not good_images:
            continue
        try:
            batch = image_processor(good_images, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError):
            # One unusable image (e.g. too small to crop) must not cost the whole chunk: retry singly.
            kept, kept_labels = [], []
            for image, label in zip(good_images, good_labels):
                try:
                    kept.append(image_processor([image], return_tensors="pt")["pixel_values"])
                    kept_labels.append(label)
                except (ValueError, TypeError):
                    skipped += 1
            if not kept:
                continue
            batch, good_labels = torch.cat(kept), kept_labels
        pixels.append((batch.clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(torch.tensor(good_labels, dtype=torch.long))
    if not pixels:
        raise ValueError("no readable image in the data set")
    out = PreloadedImages(torch.cat(pixels), torch.cat(labels))
    out.num_skipped = skipped
    if key is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}")
        save_file({"pixels": out.pixels.contiguous(), "labels": out.labels,
                   "num_skipped": torch.tensor(skipped)}, str(tmp))
        os.replace(tmp, file)
    return out
