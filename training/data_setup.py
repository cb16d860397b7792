"""Building a trainer's image data from its ``data`` section: the one place every image stage uses.

Stage 1 (``train_tokenizer``), stage 2 (``train_policy``), ``extract_tokens`` and the demo read the
same :class:`DataConfig`; ``build_train_data`` turns it (and the tokenizer's image size) into a data
set plus its collate function, preloaded into memory for small sets. A stream (webdataset tar shards, or
``data.streaming: true``) is read in one of three ways, each defined here:

- stage 1 and stage 2 online (no reward table) train from it: a :class:`StreamData`, read per epoch and rank
  by :class:`StreamEpochs` (by ``train.max_steps``; ``data.limit`` keeps the stream's first N items on any
  number of ranks);
- a stage that needs a bounded subset (stage 2's reward table: ``train.table_size + train.val_size`` images;
  ``latent-stats``: ``--limit`` images) reads its *first N items in stream order* into a map-style
  ``datasets.Dataset`` (:func:`load_bounded_split`, :func:`take_stream_head`) and goes on as for any indexable
  set; what it stores records that its rows are "the first N of the stream";
- a stage that reads the whole set once (``extract_tokens``) takes the stream shard by shard
  (:func:`stream_shards`), each shard one resumable unit.

Anything else that needs indexable data calls :func:`require_map_style`. The loaders themselves live in
``data`` (sources, transforms, unreadable-file handling) and ``batches`` (preloading, resumable
samplers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .batches import PreloadedImages, collate_preloaded, preload_images


@dataclass
class DataConfig:
    # fashion_mnist | natural_crops | an ImageNet-layout folder (train/<wnid>/, val/) | webdataset tar shards
    # ("shards/train-{000000..000127}.tar" or a folder of .tar) | a folder | a save_to_disk dir | a cached hub name
    dataset: str = "fashion_mnist"
    train_split: str = "train"
    eval_split: str = "test"                 # "val" for ImageNet
    label_file: str | None = None            # flat val/: LOC_val_solution.csv or "filename label" lines; None: looked for
    resize_mode: str = "pad"                 # "pad" letter-boxes small images (28 -> 32); "shortest_edge" resizes
    crop: str = "center"
    flip: bool = False                       # random horizontal flips (processor: seeded by step; natural: per item)
    # "processor": the AdaTokImageProcessor (letter-boxing for Fashion-MNIST); "natural": the field's random crop
    # + flip in training and ADM's centre crop for evaluation (data_transforms.NaturalImageTransform)
    transforms: str = "processor"
    # extract_tokens only: "model" encodes through the tokenizer folder's saved preprocessor_config.json (the
    # geometry the model was trained and evaluated with) when it has one; "data": built from this section
    processor: str = "model"
    crop_scale: list[float] | None = None    # transforms "natural": area range of a random resized crop; None:
                                             # shorter-side resize + random crop
    preload: bool | None = None              # None: preload iff the decoded split fits preload_max_gb; true: must
    preload_max_gb: float = 4.0
    num_workers: int | None = None           # None: data_sources.default_num_workers() (0 for a preloaded set)
    # use only the first N training images (>= 1, or null for all). A stream: its first N items in listed order
    # (shards as listed, before any shuffle), the same N on any number of ranks and workers, which split them
    # disjointly (each reads the N items' bytes and decodes its share); shuffle_buffer reorders only these N
    limit: int | None = None
    num_crops: int = 20000                   # natural_crops only
    latents: str | None = None               # a cache-latents folder: stage 1 reads VAE latents from it (no VAE encoder per step)
    # None: tar shards stream, everything else is map-style; true: read any source as a stream (a hub name is
    # then read over the network); false: copy tar shards into a map-style Arrow cache. Stage 1 trains from a
    # stream (by train.max_steps; see StreamEpochs), and so does stage 2 online (no reward table); stage 2's reward
    # table and latent-stats read its first N items; extract_tokens reads it shard by shard; cache-latents needs
    # indexable data.
    streaming: bool | None = None
    shuffle_buffer: int = 10000              # streams only: shard order + a buffer this large, seeded by train.seed + epoch

    def __post_init__(self):
        if self.transforms not in TRANSFORMS:
            raise ValueError(f"data.transforms must be one of {TRANSFORMS}, got {self.transforms!r}")
        for name, low in (("limit", 1), ("num_workers", 0), ("num_crops", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"data.{name} must be >= {low}" + (" or null" if name != "num_crops" else "")
                                 + f", got {value}")
        if self.streaming is not None and not isinstance(self.streaming, bool):
            raise TypeError(f"data.streaming must be true, false or null, got {self.streaming!r}")
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be an int >= 0 (0: no shuffling), got {self.shuffle_buffer!r}")
        if self.streaming and self.preload:
            raise ValueError(f"data.preload: true with data.streaming: true: a stream's size is unknown and it is read "
                             f"once per epoch, so it cannot be preloaded; set data.preload to null or false")
        if not self.preload_max_gb >= 0:
            raise ValueError(f"data.preload_max_gb must be >= 0, got {self.preload_max_gb}")
        if self.crop_scale is not None and (len(self.crop_scale) != 2
                                            or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")


TRANSFORMS = ("processor", "natural")


def build_image_processor(model_config, data: DataConfig, train: bool):
    """The tokenizer's image processor for ``data`` (random crops only when training asks for them). A
    ``transforms: natural`` model saves the field's evaluation geometry: shorter side resized (bicubic), centre crop."""
    from ..tokenizer.image_processing_adatok import AdaTokImageProcessor

    if data.transforms == "natural":
        return AdaTokImageProcessor(size=model_config.image_size, resize_mode="shortest_edge", crop="center",
                                    do_flip=False, resample="bicubic")
    return AdaTokImageProcessor(size=model_config.image_size, resize_mode=data.resize_mode,
                                crop="random" if (train and data.crop == "random") else "center", do_flip=False)


def load_split(data: DataConfig, split: str, seed: int = 0, limit: int | None = None):
    """One split of ``data.dataset`` (the first ``limit`` images when given)."""
    from .data import load_image_dataset

    kwargs = {"num_crops": data.num_crops, "seed": seed} if data.dataset == "natural_crops" else {}
    return load_image_dataset(data.dataset, split=split, limit=limit, label_file=data.label_file,
                              streaming=data.streaming, **kwargs)


def require_map_style(dataset, data: DataConfig, what: str):
    """``dataset`` itself when it is indexable (map-style); a ``ValueError`` naming ``data.dataset`` and ``what``
    needs it for when it is a stream (``datasets.IterableDataset``: tar shards, or ``data.streaming: true``)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            f"data.dataset {data.dataset!r} is read as a stream (webdataset tar shards, or data.streaming true), but "
            f"{what} needs indexable data (its positions are stored and revisited); set data.streaming false "
            f"(tar shards are then copied into an Arrow cache) or convert the set to an ImageNet-layout folder or "
            f"a save_to_disk data set. Stage 1 (train_tokenizer) and stage 2 online train from a stream; stage "
            f"2's reward table and latent-stats read its first N items; extract_tokens reads it shard by shard")
    return dataset


def take_stream_head(dataset, count: int, folder: str | os.PathLike | None = None, *, reuse: bool = False):
    """The first ``count`` items of the stream ``dataset`` (fewer if it is shorter), in stream order, as a
    map-style ``datasets.Dataset`` with the stream's columns.

    Deterministic: the same stream order gives the same rows in the same order. The stream is read as it is
    (shards in their listed order, no shuffle); images are copied undecoded (``datasets.Image(decode=False)``),
    so an unreadable file is skipped later, where the map-style path skips it, not here. ``folder``: the rows
    are written there as Arrow (``Dataset.from_generator``) and memory-mapped, so a head of 100k ImageNet JPEGs
    (~11 GB) does not sit in RAM; an existing copy is deleted first unless ``reuse`` (ranks after the one that
    wrote it read it back without reading the stream). ``folder=None``: a temporary folder, loaded into memory
    and deleted (for small heads)."""
    import datasets

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: expected a positive int (the number of stream items to take), got {count!r}")
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"dataset: expected a datasets.IterableDataset (a stream), got {type(dataset).__name__}")
    features = dataset.features
    if features is not None and isinstance(features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        features = dataset.features

    def rows(stream, n):
        yield from stream.take(n)

    def build(where: str, in_memory: bool):
        # The fingerprint names the builder's folder: fixed, so that `reuse` finds the copy another rank wrote.
        return datasets.Dataset.from_generator(rows, features=features, cache_dir=where, keep_in_memory=in_memory,
                                               gen_kwargs={"stream": dataset, "n": count},
                                               fingerprint=f"stream-head-{count}")

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="stream-head-") as where:
            head = build(where, in_memory=True)
    else:
        folder = Path(folder)
        if folder.exists() and not reuse:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        head = build(str(folder), in_memory=False)
    if features is not None and isinstance(features.get("image"), datasets.Image):
        head = head.cast_column("image", datasets.Image())   # decoded on read, like any map-style image column
    return head


def stream_head_record(dataset, count: int, taken: int) -> dict:
    """What a stage stores about rows it took with :func:`take_stream_head` (its cache metadata), so that a
    cache of the first ``count`` items of one stream is not reused for another count or stream."""
    return {"rows": f"the first {count} items of the stream, in stream order (shards in listed order, no shuffle)",
            "count": int(count), "taken": int(taken), "num_shards": int(dataset.num_shards)}


def load_bounded_split(data: DataConfig, split: str, seed: int, count: int | None, what: str, count_name: str,
                       limit: int | None = None, folder: str | os.PathLike | None = None, accelerator=None):
    """``(dataset, stream_record or None)``: one split for a stage that needs a bounded subset of it.

    A map-style split is returned as :func:`load_split` gives it (the stage draws its own subset) with ``None``.
    A stream (tar shards, ``data.streaming: true``) has no length and cannot be indexed, so its first ``count``
    items (after ``limit``) become a map-style set (:func:`take_stream_head`, written under ``folder``), returned
    with :func:`stream_head_record`; ``count`` None is a ``ValueError`` naming ``count_name`` (the stage's
    setting) and ``what``. With an ``accelerator`` of several processes (and a ``folder``) the main process
    reads the stream and writes the head; the others wait for it and read that copy (on a shared file system)
    or, where they cannot see it, read the same first items themselves."""
    import datasets

    dataset = load_split(data, split, seed, limit=limit)
    if not isinstance(dataset, datasets.IterableDataset):
        return dataset, None
    if count is None:
        raise ValueError(f"data.dataset {data.dataset!r} is read as a stream, whose length is unknown, and {what} "
                         f"reads a bounded subset of it (the stream's first N items): set {count_name}")
    if accelerator is None or accelerator.num_processes == 1 or folder is None:
        head = take_stream_head(dataset, count, folder)
    else:
        if accelerator.is_main_process:
            head = take_stream_head(dataset, count, folder)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            head = take_stream_head(dataset, count, folder, reuse=True)
    if len(head) == 0:
        raise ValueError(f"data.dataset {data.dataset!r}: the stream is empty, so {what} has no image to read")
    return head, stream_head_record(dataset, count, len(head))


def stream_shards(dataset) -> list:
    """A stream cut into its ``num_shards`` shards, in order (``datasets.distributed.split_dataset_by_node``
    with one node per shard: each part is exactly one shard, e.g. one tar). Concatenated in this order they are
    the stream read without shuffling; a whole-set stage gives each rank whole shards and resumes shard by
    shard. A stream with one shard (a single parquet file, a hub set stored as one file) is one unit."""
    from .data_sources import shard_stream

    total = int(dataset.num_shards)
    return [shard_stream(dataset, index, total) for index in range(total)]


def build_train_data(cfg, model_config, allow_stream: bool = False, what: str = "this trainer", train: bool = True):
    """``(data set, collate)`` of the training split for any run config with a ``data``
    (:class:`DataConfig`) and a ``train.seed`` section: preloaded when the decoded split fits
    ``data.preload_max_gb`` (``data_sources.decide_preload``), else decoded per item in loader workers.
    A stream is a :class:`StreamData` (read through :class:`StreamEpochs`) when ``allow_stream``, else the
    ``ValueError`` of :func:`require_map_style` naming ``what``. ``train=False`` reads the training split
    through the deterministic evaluation processor (no random crop or flip), e.g. for a reward table."""
    import datasets

    data = cfg.data
    dataset = load_split(data, data.train_split, cfg.train.seed, limit=data.limit)
    if isinstance(dataset, datasets.IterableDataset):
        if not allow_stream:
            require_map_style(dataset, data, what)
        if data.preload:
            raise ValueError(f"data.preload: true, but data.dataset {data.dataset!r} is read as a stream (its size is "
                             "unknown and it is read once per epoch); set data.preload to null or false, or "
                             "data.streaming false to copy tar shards into a map-style set first")
        from .data import collate_images

        transform = build_train_transform(model_config, data, cfg.train.seed) if train else \
            build_image_processor(model_config, data, train=False)
        return StreamData(dataset, transform, limit=data.limit), collate_images
    return train_data_from(dataset, cfg, model_config, train)


def train_data_from(dataset, cfg, model_config, train: bool = True):
    """``(data set, collate)`` of a map-style training ``dataset`` (the map-style half of
    :func:`build_train_data`, also for a stream's head from :func:`load_bounded_split`)."""
    from .data_sources import decide_preload

    data = cfg.data
    transform = build_train_transform(model_config, data, cfg.train.seed) if train else \
        build_image_processor(model_config, data, train=False)
    natural = train and data.transforms == "natural"
    if decide_preload(len(dataset), model_config.image_size, preload=data.preload, preload_max_gb=data.preload_max_gb,
                      channels=getattr(model_config, "num_channels", 3), random_transform=natural):
        return preload_images(dataset, transform), collate_preloaded
    from .data import ImageTransformDataset, collate_images

    return ImageTransformDataset(dataset, transform), collate_images


def build_train_transform(model_config, data: DataConfig, seed: int):
    """The training split's per-image transform: the processor, or for ``transforms: natural`` the field's
    random crop + flip seeded per (seed, epoch, image)."""
    if data.transforms == "natural":
        from .data_transforms import NaturalImageTransform

        scale = tuple(data.crop_scale) if data.crop_scale is not None else None
        return NaturalImageTransform(model_config.image_size, train=True, seed=seed, scale=scale, flip=data.flip)
    return build_image_processor(model_config, data, train=True)


def resolve_num_workers(data, num_workers: int | None) -> int:
    """``num_workers`` (None: ``data_sources.default_num_workers()``), 0 for a preloaded set (sliced in-process)."""
    if isinstance(data, PreloadedImages):
        return 0 if num_workers is None else num_workers
    from .data_sources import default_num_workers

    return default_num_workers() if num_workers is None else num_workers


def step_flips(data: DataConfig) -> bool:
    """Whether the trainer flips whole batches by step (``flip_batch``): not when the natural transform
    already flips each image."""
    return data.flip and data.transforms != "natural"


def epoch_batches(data, collate, sampler, num_workers: int | None = 0):
    """A callable giving one epoch's batches from ``sampler``: a preloaded set without workers is sliced
    directly (no per-item collate); anything else goes through one DataLoader (workers may persist). A
    per-item seeded transform (``NaturalImageTransform``) gets ``(epoch, index)`` pairs, so crops change each
    epoch and repeat on resume."""
    num_workers = resolve_num_workers(data, num_workers)
    if isinstance(data, PreloadedImages) and num_workers == 0:
        return lambda: (data.batch(indices) for indices in sampler)
    if hasattr(getattr(data, "image_processor", None), "transform"):
        from .data_loading import EpochTaggedBatchSampler

        sampler = EpochTaggedBatchSampler(sampler)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
    return lambda: loader


@dataclass
class StreamData:
    """A training split read as a stream (``datasets.IterableDataset``) and its per-image transform: what
    :func:`build_train_data` returns for tar shards or ``data.streaming: true``; :class:`StreamEpochs` reads it.
    ``limit``: ``dataset`` is the stream's first ``limit`` items (``data.limit``), which ranks and workers then
    split by row, not by shard (``data_sources.build_stream_loader(limited=True)``)."""

    dataset: object
    transform: object
    limit: int | None = None

    def describe(self) -> str:
        head = f", its first {self.limit} items" if self.limit is not None else ""
        return f"a stream of {self.dataset.num_shards} shard(s){head}"


class StreamEpochs:
    """This rank's epochs of a :class:`StreamData`, with the interface a :class:`~.loop.Stage` gives the loop:
    ``set_position(epoch, batch)`` (the loop's resume and every rollover), then ``stream()`` for the epoch's
    remaining batches (``collate_images`` dicts: ``pixel_values``, ``labels``, ``keys``, ``num_skipped``, ...).

    Reading: ``data_sources.build_stream_loader`` -- this rank's part of the shards (of a limited stream, of its
    rows: see :class:`StreamData`), decoded in ``num_workers`` workers (None: its default, capped at the rank's
    shard count), shard order and a ``shuffle_buffer`` shuffled
    from ``seed`` + epoch; the epoch reaches the workers and per-item transforms (``NaturalImageTransform`` seeds
    each image by ``(seed, epoch, __key__)``). Unreadable images are dropped from their batch and counted in
    ``num_skipped``, as in the map-style path.

    Exact resume: a resumed epoch is read again from its start and its first ``batch`` batches are dropped
    (decoded, not trained on: resuming late in a long epoch costs up to one epoch of decoding). That is exact
    when the order is the same, which holds for the same shards, ``data.limit``, ``seed``, epoch,
    ``shuffle_buffer``, world size and number of workers (each worker's examples are in a fixed order and the
    DataLoader takes the workers' batches in turn); a resume that finds fewer batches than the checkpoint had
    taken says so (``ValueError``) instead of silently training on other data.

    Epoch end: ranks may hold unequal numbers of batches (unequal shards). Every batch, all ranks agree through
    ``agree`` (``distributed.any_rank``) whether any rank's stream is exhausted, and all end the epoch together,
    so none waits at a collective for one that ran out (the surplus batches of the longer ranks are not read
    that epoch). Train streams by ``train.max_steps``: an epoch is not a fixed number of steps.
    """

    def __init__(self, data: StreamData, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, shuffle_buffer: int = 0, seed: int = 0, agree=bool):
        from .data_sources import build_stream_loader

        self.loader = build_stream_loader(data.dataset, data.transform, batch_size, rank=rank, world_size=world_size,
                                          num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
                                          limited=data.limit is not None)
        self.agree, self.seed, self.epoch, self.start = agree, seed, 0, 0

    @classmethod
    def for_run(cls, data: StreamData, cfg, accelerator) -> "StreamEpochs":
        """This process's reader of ``data`` for a run config with ``data`` (:class:`DataConfig`) and ``train``
        (``batch_size``, ``seed``) sections: its rank's part, epoch ends agreed over the accelerator's ranks."""
        from .distributed import any_rank

        return cls(data, cfg.train.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes,
                   num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                   agree=lambda flag: any_rank(accelerator, flag))

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = int(epoch), int(batch)
        self.loader.dataset.set_epoch(self.epoch)   # workers are not persistent: each epoch's copy sees it
        # The DataLoader draws its workers' base seed from this generator at every iter(): from the global RNG
        # it would shift the training randomness (token masks) by one draw per epoch, and differently on resume.
        self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def stream(self):
        """The current epoch's batches from ``start`` on (the batches before it are read and dropped)."""
        epoch, start, taken = self.epoch, self.start, 0
        batches = iter(self.loader)
        while True:
            batch = next(batches, None)
            if self.agree(batch is None):   # a collective with several ranks: all stop together
                break
            taken += 1
            if taken > start:
                yield batch
        if taken < start or taken == 0:
            raise ValueError(
                f"data.dataset: epoch {epoch} of the stream gave {taken} batch(es) on this rank"
                + (f", but the checkpoint resumed had taken {start}: the shards, data.limit, data.num_workers, "
                   f"data.shuffle_buffer or the number of processes changed since it was written" if start else
                   "; the stream is empty (fewer images than processes x workers?)"))


def flip_batch(pixels: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Random horizontal flips drawn from (seed, step): the same on resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flip = torch.rand(pixels.shape[0], generator=g) < 0.5
    return torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
