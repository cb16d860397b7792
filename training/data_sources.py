"""Image data at ImageNet scale: the layouts it ships in, streaming, sharding and the preload decision.

Sources (each through Hugging Face ``datasets``; nothing here reads a tar file or a parquet file itself):

- :func:`load_imagenet_folder` -- ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/`` either in class folders or
  flat with a label file: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the first word of
  ``PredictionString`` is the wnid) or a plain ``filename label`` text file (``label`` a wnid, or an int
  index into the sorted wnids as in Caffe's ``val.txt``). Labels always index the *train* classes.
- :func:`load_webdataset` -- tar shards named by a brace pattern (``shards/train-{000000..000009}.tar``), a
  glob, or a folder of ``.tar``, read by ``datasets``' own ``webdataset`` builder (the ``webdataset``
  package is not needed), streamed by default.

(Streaming anything ``load_image_dataset`` reads is ``data.load_streaming``, beside that dispatcher: the
sources sit below ``data.py`` and import nothing from it.)

Scale:

- :func:`decoded_size_gb` / :func:`decide_preload` -- preload a split into RAM only when its decoded
  uint8 tensor fits ``preload_max_gb``; asking for it when it does not fit is a ``ValueError`` with the size.
- :func:`default_num_workers` -- ``min(4, usable cores)`` where the platform can fork, else 0.
- :func:`shard_stream` and :class:`StreamingImageDataset` -- each rank and each DataLoader worker reads a
  disjoint part of a stream (see :func:`shard_stream` for exactly what is and is not guaranteed), and
  :func:`build_stream_loader` puts them together.
"""

from __future__ import annotations

import csv
import glob
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from .data_common import check_limit, hub_offline, standardise_columns
from .data_loading import collate_images, process_item

__all__ = [
    "DEFAULT_PRELOAD_MAX_GB",
    "IMAGE_EXTENSIONS",
    "StreamingImageDataset",
    "build_stream_loader",
    "check_limit",
    "decide_preload",
    "decoded_size_gb",
    "default_num_workers",
    "expand_shard_pattern",
    "is_imagenet_layout",
    "is_shard_spec",
    "load_imagenet_folder",
    "load_webdataset",
    "read_label_file",
    "shard_stream",
]

DEFAULT_PRELOAD_MAX_GB = 4.0
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# The split folder names ImageNet releases use, for the split names our configs use.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "validation": ("val", "validation"),
                  "test": ("test",)}
# Label files looked for (in the split folder, the root and up to three parents: Kaggle puts
# LOC_val_solution.csv beside ILSVRC/, three levels above ILSVRC/Data/CLS-LOC/).
_LABEL_FILE_NAMES = ("LOC_{split}_solution.csv", "{split}_labels.txt", "{split}.txt", "{split}_labels.csv")


# ==============================================================================================
# ImageNet folders
# ==============================================================================================

def _images_in(folder: Path) -> list[Path]:
    # scandir's entries know their type without a stat per file (1.28M files in ImageNet's train/).
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _split_folder(root: Path, split: str) -> Path | None:
    for name in _SPLIT_FOLDERS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return None


def is_imagenet_layout(root: str | os.PathLike) -> bool:
    """True when ``root`` has a ``train/`` of class folders, or a flat ``val/`` of images."""
    root = Path(root)
    train, val = root / "train", _split_folder(root, "val")
    if train.is_dir() and _class_folders(train) and not _images_in(train):
        return True
    return val is not None and not _class_folders(val) and bool(_images_in(val))


def read_label_file(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict[str, str]:
    """``{image stem: wnid}`` from Kaggle's ``LOC_val_solution.csv`` or a ``filename label`` text file.

    In the text format ``label`` is a wnid, or an int indexing the sorted ``class_names`` (0-based, Caffe's
    ``val.txt``). Blank lines are skipped; anything else malformed is a ``ValueError`` naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label_file: {path} does not exist")
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.replace(" ", "").lower().startswith("imageid,predictionstring"):
            for line_no, row in enumerate(csv.DictReader(f), start=2):
                words = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not words:
                    raise ValueError(f"{path}:{line_no}: expected 'ImageId,PredictionString', got {row}")
                labels[Path(row["ImageId"]).stem] = words[0]
            return labels
        for line_no, line in enumerate(f, start=1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'filename label', got {line.strip()!r}")
            name, label = parts
            if label.isdigit():
                if class_names is None or int(label) >= len(class_names):
                    raise ValueError(
                        f"{path}:{line_no}: the integer label {label} needs the class list of train/ "
                        f"({0 if class_names is None else len(class_names)} classes) to name its wnid"
                    )
                label = class_names[int(label)]
            labels[Path(name).stem] = label
    return labels


def _find_label_file(root: Path, split_dir: Path, split: str) -> Path | None:
    names = dict.fromkeys((split_dir.name, split))
    for folder in [split_dir, root, *list(root.parents)[:3]]:
        for pattern in _LABEL_FILE_NAMES:
            for name in names:
                candidate = folder / pattern.format(split=name)
                if candidate.is_file():
                    return candidate
    return None


def load_imagenet_folder(
    root: str | os.PathLike,
    split: str = "train",
    *,
    label_file: str | os.PathLike | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """An ImageNet-layout split as a ``Dataset`` (``image`` by path, ``label`` a ``ClassLabel`` of wnids).

    Class names are the sorted folder names of ``train/`` (so every split shares one label space);
    without ``train/`` they are those of the split itself or of its label file. A flat split folder gets
    labels from ``label_file`` (else the first of ``LOC_<split>_solution.csv``, ``<split>_labels.txt``,
    ``<split>.txt`` found in the split folder, the root or up to three parents); with none, it has no
    ``label`` column and a warning says where it looked. Images are listed, not opened: a corrupt file
    costs nothing until :class:`~adatok_vlm.training.data.ImageTransformDataset` skips it.
    """
    limit = check_limit(limit)
    root = Path(root).expanduser()
    split_dir = _split_folder(root, split)
    if split_dir is None:
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(f"split: {root} has no folder for split {split!r} (folders: {have})")
    train_dir = root / "train"
    class_names = _class_folders(train_dir) if train_dir.is_dir() else []
    split_classes = _class_folders(split_dir)
    paths: list[str] = []
    wnids: list[str] | None = []
    if split_classes:  # class folders
        class_names = class_names or split_classes
        unknown = sorted(set(split_classes) - set(class_names))
        if unknown:
            raise ValueError(f"{split_dir}: class folders {unknown[:5]} are not classes of {train_dir}")
        for wnid in split_classes:
            files = _images_in(split_dir / wnid)
            paths += [str(p) for p in files]
            wnids += [wnid] * len(files)
    else:  # flat, labels from a file
        files = _images_in(split_dir)
        paths = [str(p) for p in files]
        found = Path(label_file) if label_file is not None else _find_label_file(root, split_dir, split)
        if found is None:
            warnings.warn(
                f"{split_dir} is a flat folder and no label file was found (looked for "
                f"{', '.join(p.format(split=split_dir.name) for p in _LABEL_FILE_NAMES)} there, in {root} and its "
                f"parents); it is loaded without labels. Pass label_file= to label it."
            )
            wnids = None
        else:
            by_stem = read_label_file(found, class_names or None)
            missing = [p.name for p in files if p.stem not in by_stem]
            if missing:
                raise ValueError(
                    f"label_file: {found} has no label for {len(missing)} of the {len(files)} images in {split_dir} "
                    f"(e.g. {missing[:3]})"
                )
            wnids = [by_stem[p.stem] for p in files]
            class_names = class_names or sorted(set(wnids))
            unknown = sorted(set(wnids) - set(class_names))
            if unknown:
                raise ValueError(f"label_file: {found} names classes {unknown[:5]} that are not folders of {train_dir}")
    if not paths:
        raise ValueError(f"{split_dir}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if limit is not None:
        paths = paths[:limit]
        wnids = None if wnids is None else wnids[:limit]
    columns: dict[str, list] = {"image": paths}
    features = {"image": datasets.Image()}
    if wnids is not None:
        index = {name: i for i, name in enumerate(class_names)}
        columns["label"] = [index[w] for w in wnids]
        features["label"] = datasets.ClassLabel(names=list(class_names))
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ==============================================================================================
# WebDataset shards and streaming
# ==============================================================================================

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        if int(last) < int(first):
            raise ValueError(f"shards: the range {match.group(0)} in {pattern!r} runs backwards")
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        head, tail = pattern[: match.start()], pattern[match.end():]
        return [e for n in range(int(first), int(last) + 1) for e in _expand_braces(f"{head}{n:0{width}d}{tail}")]
    match = _CHOICE.search(pattern)
    if match:
        head, tail = pattern[: match.start()], pattern[match.end():]
        return [e for choice in match.group(1).split(",") for e in _expand_braces(head + choice + tail)]
    return [pattern]


def expand_shard_pattern(spec: str | os.PathLike) -> list[str]:
    """The tar files named by ``spec``: a brace pattern (``a-{000..009}.tar``, ``{train,val}``), a glob, one
    ``.tar``, or a folder (its ``*.tar``, sorted). Every named file must exist (``FileNotFoundError``)."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
        if not files:
            raise FileNotFoundError(f"shards: no .tar files in the folder {path}")
        return files
    files = []
    for item in _expand_braces(os.path.expanduser(spec)):
        files += sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    missing = [f for f in files if not Path(f).is_file()]
    if missing or not files:
        raise FileNotFoundError(
            f"shards: {len(missing)} of the {len(files)} shard(s) named by {spec!r} do not exist (e.g. {missing[:3]})"
        )
    return files


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """True for a ``.tar`` file, pattern or glob, or a folder holding ``.tar`` files and no images."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return any(path.glob("*.tar")) and not _images_in(path) and not _class_folders(path)
    return spec.endswith(".tar") or bool(_RANGE.search(spec) and ".tar" in spec)


def _with_offline(fn, *args, **kwargs):
    with hub_offline():
        return fn(*args, **kwargs)


def load_webdataset(
    shards: str | os.PathLike | Sequence[str],
    *,
    streaming: bool = True,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.IterableDataset | datasets.Dataset:
    """WebDataset tar shards through ``datasets``' ``webdataset`` builder, offline.

    Each sample is the files sharing a key (``0001.jpg`` + ``0001.cls``); the image file becomes ``image``,
    ``cls`` becomes ``label`` (an int; class names are not stored in shards), ``__key__`` stays (used to seed
    per-item augmentation and to recognise samples). ``streaming=True`` (the default) reads the tars as
    they are, with one ``datasets`` shard per tar, so ranks and workers can split them
    (:func:`shard_stream`); ``streaming=False`` copies them into an Arrow cache first (only for small sets).
    """
    limit = check_limit(limit)
    files = list(shards) if isinstance(shards, (list, tuple)) else expand_shard_pattern(shards)
    loaded = _with_offline(
        datasets.load_dataset, "webdataset", data_files={"train": files}, split="train", streaming=streaming,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    loaded = standardise_columns(loaded, f"the shards {files[0]}...")
    if limit is not None:
        loaded = loaded.take(limit) if streaming else loaded.select(range(min(limit, len(loaded))))
    return loaded


# ==============================================================================================
# How to read: preload or not, workers, sharding across ranks and workers
# ==============================================================================================

def decoded_size_gb(num_images: int, image_size: int, channels: int = 3, bytes_per_value: int = 1) -> float:
    """The memory a preloaded split takes: ``num_images x channels x image_size^2 x bytes_per_value`` (GB = 1e9 B).

    Preloading keeps uint8 pixels (``bytes_per_value=1``): ImageNet train at 256 is 1.28M x 3 x 256^2 = 252 GB.
    """
    for name, value in (("num_images", num_images), ("image_size", image_size), ("channels", channels),
                        ("bytes_per_value", bytes_per_value)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_images" else 1):
            raise ValueError(f"{name}: expected a {'non-negative' if name == 'num_images' else 'positive'} int, got {value!r}")
    return num_images * channels * image_size * image_size * bytes_per_value / 1e9


def decide_preload(
    num_images: int | None,
    image_size: int,
    *,
    preload: bool | None = None,
    preload_max_gb: float = DEFAULT_PRELOAD_MAX_GB,
    channels: int = 3,
    random_transform: bool = False,
) -> bool:
    """Whether to decode a split once into RAM (True) or in DataLoader workers every epoch (False).

    ``preload=None`` decides: True exactly when :func:`decoded_size_gb` ``<= preload_max_gb``.
    ``preload=False`` never preloads. ``preload=True`` preloads, and is a ``ValueError`` stating the size
    and the bound when the split does not fit, or when it is a stream (``num_images=None``: unknown size).
    ``random_transform=True`` (a training transform that crops/flips per item and epoch) never preloads by
    decision, and asking for it is a ``ValueError``: a preloaded tensor would freeze one crop per image.
    """
    if preload is not None and not isinstance(preload, bool):
        raise TypeError(f"preload: expected True, False or None (decide by size), got {preload!r}")
    if isinstance(preload_max_gb, bool) or not isinstance(preload_max_gb, (int, float)) or not preload_max_gb >= 0:
        raise ValueError(f"preload_max_gb: expected a number >= 0, got {preload_max_gb!r}")
    if preload is False:
        return False
    if random_transform:
        if preload:
            raise ValueError("preload: True with a random per-item training transform (random crop / flip) would "
                             "freeze one crop per image for the whole run; set preload to null or false")
        return False
    if num_images is None:
        if preload:
            raise ValueError("preload: True asks to preload a streamed data set, whose size is unknown; "
                             "set preload to false (or null) for streaming / sharded data")
        return False
    size = decoded_size_gb(num_images, image_size, channels)
    fits = size <= preload_max_gb
    if preload and not fits:
        raise ValueError(
            f"preload: True, but the split decodes to {size:.3g} GB ({num_images} images x {channels} x "
            f"{image_size} x {image_size} bytes), above preload_max_gb={preload_max_gb:g}; set preload to null "
            f"(decode in DataLoader workers) or raise preload_max_gb if this machine has the memory"
        )
    return fits


def default_num_workers(max_workers: int = 4) -> int:
    """``min(max_workers, usable cores)`` where worker processes can be forked, else 0.

    Where ``fork`` is unavailable (Windows, macOS' default spawn is still allowed but re-imports
    everything per worker) the loader decodes in the main process.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(max_workers), cores))


def shard_stream(dataset: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """This rank's part of a stream (``datasets.distributed.split_dataset_by_node``).

    Guarantees, per epoch:

    - when ``num_shards`` is a multiple of ``world_size`` each rank gets whole shards (``num_shards /
      world_size`` of them); DataLoader workers then split the rank's shards among themselves
      (``datasets``' worker sharding), so every example is read exactly once by exactly one (rank, worker);
      ranks read equal numbers of examples only when the shards are of equal size;
    - otherwise every rank reads *every* shard and keeps every ``world_size``-th example (still disjoint
      and complete, at ``world_size`` times the I/O), and the per-rank counts differ by at most one per
      (worker's shard group);
    - a worker whose index is ``>= `` the rank's shard count reads nothing (use at most that many workers);
    - not guaranteed: equal step counts per rank with unequal shards. Train streams by step
      (``max_steps``), not to the end of an epoch, so no rank waits at a collective for one that ran out.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"dataset: expected a datasets.IterableDataset, got {type(dataset).__name__}")
    if world_size == 1:
        return dataset
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Decode and process a ``datasets.IterableDataset`` as it streams, in DataLoader workers.

    Yields ``{"pixel_values": [3, S, S], "label": int, "key": str}`` or a
    :class:`~adatok_vlm.training.data.SkippedImage` (a corrupt image is skipped and counted, as for
    map-style sets). ``key`` is the webdataset ``__key__`` (else the running example number of this
    worker); a :class:`~adatok_vlm.training.data_transforms.NaturalImageTransform` is seeded by
    ``(seed, epoch, key)``. ``set_epoch`` reshuffles (with ``shuffle_buffer``) and reseeds.

    Resume: for a stream, the exact position is ``datasets.IterableDataset.state_dict()`` (datasets >= 2.18;
    present in the installed version). With ``num_workers=0`` it is exact via :meth:`state_dict` /
    :meth:`load_state_dict`; with workers the state lives in each worker, and only torchdata's
    ``StatefulDataLoader`` collects it. Without that, a resumed stream restarts its epoch from the
    beginning (same order for the same seed and epoch), so the examples already seen in the interrupted
    epoch are seen again.

    ``row_split=(rank, world_size)`` reads a stream that is its first N items (``data.limit``: ``take(N)``)
    without splitting its shards: every (rank, DataLoader worker) reads the whole head (its bytes; images are
    decoded only by the reader that keeps them) and keeps the rows at positions ``rank * workers + worker``
    modulo ``world_size * workers``. ``datasets`` splits a ``take(N)`` by shard group instead (each group its
    own first ``N / groups`` items, not the stream's first N), on several ranks and on several workers alike.
    A row without ``__key__`` is then keyed by its position in the head.
    """

    def __init__(self, dataset: datasets.IterableDataset, image_processor: Any, *, epoch: int = 0,
                 image_column: str = "image", label_column: str = "label",
                 row_split: tuple[int, int] | None = None) -> None:
        if not isinstance(dataset, datasets.IterableDataset):
            raise TypeError(f"dataset: expected a datasets.IterableDataset, got {type(dataset).__name__}")
        if not callable(image_processor):
            raise TypeError(f"image_processor: expected a callable processor, got {type(image_processor).__name__}")
        features = dataset.features or {}
        if features and image_column not in features:
            raise ValueError(f"image_column: {image_column!r} is not a column of the stream; columns: {list(features)}")
        if isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_processor, self.epoch = dataset, image_processor, int(epoch)
        self.image_column, self.label_column = image_column, label_column
        if row_split is not None:
            rank, world_size = row_split
            if not 0 <= rank < world_size:
                raise ValueError(f"row_split: expected (rank, world_size) with 0 <= rank < world_size, got {row_split}")
        self.row_split = row_split
        self.dataset.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        if self.row_split is None:   # datasets gives each worker its share of the shards
            rows = enumerate(self.dataset)
        else:
            rank, world_size = self.row_split
            workers, index = (1, 0) if worker is None else (worker.num_workers, worker.id)
            rows = islice(enumerate(_all_rows(self.dataset)), rank * workers + index, None, world_size * workers)
        for number, row in rows:
            key = row.get("__key__")
            if key is None:
                key = str(number) if self.row_split is not None else f"{0 if worker is None else worker.id}:{number}"
            label = row.get(self.label_column, -1)
            yield process_item(row[self.image_column], self.image_processor, key=key, epoch=self.epoch,
                               label=-1 if label is None else int(label), index=number)


def _all_rows(dataset: datasets.IterableDataset, batch_size: int = 64) -> Iterator[dict]:
    """Every row of ``dataset``, in its order, even inside a DataLoader worker: ``IterableDataset.iter``
    reads the whole stream there, where iterating the data set itself reads only the worker's shards."""
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch)
        for i in range(len(batch[columns[0]])):
            yield {column: batch[column][i] for column in columns}


def build_stream_loader(
    dataset: datasets.IterableDataset,
    image_processor: Any,
    batch_size: int = 32,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    limited: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's part of a stream, decoded in ``num_workers`` workers.

    ``shuffle_buffer > 0`` shuffles the shard order and a buffer of that many examples, from ``seed`` and
    the epoch (the same seed on every rank, as ``split_dataset_by_node`` requires). ``num_workers=None`` ->
    :func:`default_num_workers`, capped at this rank's shard count. Workers are not persistent, so
    ``loader.dataset.set_epoch(e)`` before each epoch reaches them.

    ``limited``: ``dataset`` is a stream's first N items (``take(N)``, what ``data.limit`` gives). Its rows
    are then split, not its shards (``StreamingImageDataset(row_split=...)``), so the ranks and workers
    together read exactly those N items, each once; a buffer shuffles them among themselves (a limited
    stream's shard order is not shuffled). ``num_workers=None`` is then not capped by the shard count.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer: expected an int >= 0, got {shuffle_buffer!r}")
    if num_workers is None:
        # A worker beyond this rank's shard count would read nothing (see shard_stream).
        total = dataset.num_shards
        per_rank = total // world_size if total % world_size == 0 else total
        num_workers = default_num_workers() if limited else min(default_num_workers(), max(1, per_rank))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0 or None, got {num_workers!r}")
    if shuffle_buffer:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if not limited:
        dataset = shard_stream(dataset, rank, world_size)
    return DataLoader(
        StreamingImageDataset(dataset, image_processor, epoch=epoch,
                              row_split=(rank, world_size) if limited else None),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
    )
