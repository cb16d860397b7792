"""Building a trainer's image data from its ``data`` section: the one place every image stage uses.

Stage 1 (``train_tokenizer``), stage 2 (``train_policy``), ``extract_tokens`` and the demo read the
same :class:`DataConfig`; ``build_train_data`` turns it (and the tokenizer's image size) into a data
set plus its collate function, preloaded into memory for small sets. A stream (webdataset tar shards, or
``data.streaming: true``) is a :class:`StreamData`, read per epoch and rank by :class:`StreamEpochs`: only
stage 1 trains from one (by ``train.max_steps``); the rest call :func:`require_map_style`. The loaders themselves live in
``data`` (sources, transforms, unreadable-file handling) and ``batches`` (preloading, resumable
samplers).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    limit: int | None = None                 # use only the first N training images (>= 1, or null for all)
    num_crops: int = 20000                   # natural_crops only
    latents: str | None = None               # a cache-latents folder: stage 1 reads VAE latents from it (no VAE encoder per step)
    # None: tar shards stream, everything else is map-style; true: read any source as a stream (a hub name is
    # then read over the network); false: copy tar shards into a map-style Arrow cache. Only stage 1 trains
    # from a stream (by train.max_steps; see StreamEpochs); stage 2, extract_tokens and the caches need indexable data.
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
            f"a save_to_disk data set. Only stage 1 (train_tokenizer) trains from a stream")
    return dataset


def build_train_data(cfg, model_config, allow_stream: bool = False, what: str = "this trainer", train: bool = True):
    """``(data set, collate)`` of the training split for any run config with a ``data``
    (:class:`DataConfig`) and a ``train.seed`` section: preloaded when the decoded split fits
    ``data.preload_max_gb`` (``data_sources.decide_preload``), else decoded per item in loader workers.
    A stream is a :class:`StreamData` (read through :class:`StreamEpochs`) when ``allow_stream``, else the
    ``ValueError`` of :func:`require_map_style` naming ``what``. ``train=False`` reads the training split
    through the deterministic evaluation processor (no random crop or flip), e.g. for a reward table."""
    import datasets

    from .data_sources import decide_preload

    data = cfg.data
    dataset = load_split(data, data.train_split, cfg.train.seed, limit=data.limit)
    transform = build_train_transform(model_config, data, cfg.train.seed) if train else \
        build_image_processor(model_config, data, train=False)
    if isinstance(dataset, datasets.IterableDataset):
        if not allow_stream:
            require_map_style(dataset, data, what)
        if data.preload:
            raise ValueError(f"data.preload: true, but data.dataset {data.dataset!r} is read as a stream (its size is "
                             "unknown and it is read once per epoch); set data.preload to null or false, or "
                             "data.streaming false to copy tar shards into a map-style set first")
        from .data import collate_images

        return StreamData(dataset, transform), collate_images
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
    :func:`build_train_data` returns for tar shards or ``data.streaming: true``; :class:`StreamEpochs` reads it."""

    dataset: object
    transform: object

    def describe(self) -> str:
        return f"a stream of {self.dataset.num_shards} shard(s)"


class StreamEpochs:
    """This rank's epochs of a :class:`StreamData`, with the interface a :class:`~.loop.Stage` gives the loop:
    ``set_position(epoch, batch)`` (the loop's resume and every rollover), then ``stream()`` for the epoch's
    remaining batches (``collate_images`` dicts: ``pixel_values``, ``labels``, ``keys``, ``num_skipped``, ...).

    Reading: ``data_sources.build_stream_loader`` -- this rank's part of the shards, decoded in ``num_workers``
    workers (None: its default, capped at the rank's shard count), shard order and a ``shuffle_buffer`` shuffled
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
                                          num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed)
        self.agree, self.seed, self.epoch, self.start = agree, seed, 0, 0

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
