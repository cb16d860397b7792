"""Token cache for the generators: run a trained AdaTok over a data set once and keep its tokens.

    python -m adatok_vlm.training.extract_tokens --tokenizer outputs/demo/model \
        --output_dir outputs/tokens --data.dataset fashion_mnist [--num_tokens auto|16]
    accelerate launch -m adatok_vlm.training.extract_tokens --config my_extract.yaml ...

A DiT over AdaTok tokens (paper Appendix B) trains on ``(tokens, length, label)`` triples; encoding
the images at every step would cost more than the DiT itself, so they are encoded once. The length
of each image is chosen by the tokenizer's policy (``--num_tokens auto``, the default: Adaptive Token
Allocation, paper Sec. 4.2), by the binary-search baseline (``--num_tokens search``: the fewest grid
tokens reaching ``config.search_threshold``, no policy needed, ~log2(m) decoder calls per image) or
fixed (``--num_tokens 16``).

``output_dir`` receives

* ``dataset/``: a ``datasets`` Arrow dataset (``save_to_disk``) with one row per image:
  ``tokens`` (only the ``L_i`` valid tokens, ``[L_i][D]`` float32), ``length`` (``L_i``), ``label``
  (a ``ClassLabel`` when the source has class names) and ``index`` (the row in the source split, or
  in a stream its position; a preloaded split numbers its readable images instead);
* ``tokens.json``: the tokenizer's path and weight fingerprint, the length mode, ``token_dim``,
  ``max_tokens``, the class names, the per-channel mean/std of the valid tokens
  (:class:`RunningTokenStats`) and the per-class length histograms ``[C, m]``
  (``LengthSampler.from_lengths(...).to_list()``), everything the DiT's config needs.

Resumable: the data is cut into fixed shards of ``extract.shard_size`` images, each written
atomically to ``shards/`` as soon as it is encoded; a restart with the same settings skips the
finished ones. The final dataset is assembled under a temporary name and renamed; ``tokens.json``
is written last and marks the cache complete. Under ``accelerate launch`` rank ``r`` encodes shards
``r, r + W, ...``; the main process assembles.

From a stream (webdataset tar shards, ``--data.streaming true``), which cannot be indexed, each cache
shard is one *stream* shard (one tar; ``data_setup.stream_shards``), so ``extract.shard_size`` plays no
part: rank ``r`` of ``W`` reads stream shards ``r, r + W, ...`` whole (any number of shards and ranks;
with fewer shards than ranks the surplus ranks read nothing), every image exactly once. Each row's
``index`` is its position in the stream read unshuffled (shards in their listed order), computed at
assembly from the counts read per shard. A restart skips the stream shards already written and reads
the rest from their start: exact as long as the shards and their order are unchanged (the cache's
manifest records the data settings, not the bytes); the images of the shard being encoded when the run
was killed are read again, never written twice. Each shard is decoded by one DataLoader worker
(``datasets`` cannot split one shard among workers), with up to ``data.num_workers`` shards in flight
at once. With ``data.limit`` the stream's first ``limit`` items are copied into a map-style set
(``data_setup.load_bounded_split``, under ``<output_dir>/stream_head``, removed once the cache is
complete) and extracted as above, with positions as indices.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..generator import LengthSampler, RunningTokenStats
from ..tokenizer.loading import model_fingerprint
from .checkpointing import write_text_atomic
from .config import config_help, deep_merge, fill_dataclass, load_yaml, parse_overrides
from .engine import configure_threads
from .launch import make_accelerator
from .data_setup import (DataConfig, build_image_processor, load_bounded_split, load_split, resolve_num_workers,
                         stream_shards)
from .data_sources import decide_preload

META_FILE = "tokens.json"
DATASET_DIR = "dataset"
SHARD_DIR = "shards"
MANIFEST = "manifest.json"
HEAD_DIR = "stream_head"


# =============================================================================================
# config
# =============================================================================================
@dataclass
class ExtractConfig:
    output_dir: str = "outputs/tokens"
    seed: int = 0                            # natural_crops' crops; nothing else is random
    batch_size: int = 256                    # images per encoder call
    shard_size: int = 8192                   # images per resumable shard
    max_shards: int | None = None            # debug: stop (unassembled) after writing this many shards per rank
    keep_shards: bool = False                # keep shards/ after the dataset is assembled
    overwrite: bool = False                  # discard an existing cache or unfinished shards of other settings
    mixed_precision: str = "no"              # tokens are stored in float32; "bf16" speeds up the encoder on GPUs
    num_threads: int | None = None


@dataclass
class TokenExtractionConfig:
    tokenizer: str = "outputs/demo/model"    # a trained AdaTok folder (save_pretrained)
    num_tokens: int | str = "auto"           # "auto" (the policy) | "search" (binary-search baseline) | an int
    data: DataConfig = field(default_factory=DataConfig)   # data.train_split is the split encoded
    extract: ExtractConfig = field(default_factory=ExtractConfig)


PROCESSORS = ("model", "data")


def extraction_processor(tokenizer: str, model_config, data: DataConfig):
    """The image processor the tokens are extracted through. ``data.processor "model"`` (the default): the
    tokenizer folder's saved ``preprocessor_config.json``, so extraction sees the geometry the model was
    trained and evaluated with (e.g. a natural-image model's centre crop, whatever ``data.resize_mode``
    says); a folder without one falls back to the ``data`` section. ``"data"``: always the ``data`` section
    (``data.transforms`` / ``resize_mode`` / ``crop``), for an explicit other geometry."""
    if data.processor not in PROCESSORS:
        raise ValueError(f"data.processor must be one of {PROCESSORS}, got {data.processor!r}")
    saved = Path(tokenizer) / "preprocessor_config.json"
    if data.processor == "data" or not saved.is_file():
        return build_image_processor(model_config, data, train=False)
    from ..tokenizer.image_processing_adatok import AdaTokImageProcessor

    processor = AdaTokImageProcessor.from_pretrained(tokenizer)
    if int(processor.size) != int(model_config.image_size):
        raise ValueError(f"{saved}: size {processor.size} differs from the tokenizer's image_size "
                         f"{model_config.image_size}; fix the file or pass --data.processor data")
    return processor


def check_num_tokens(num_tokens, model) -> int | str:
    """``"auto"`` (needs the tokenizer's policy), ``"search"`` or an int in ``1..m``; a clear error otherwise."""
    m = model.num_latent_tokens
    if isinstance(num_tokens, str) and num_tokens.strip().isdigit():
        num_tokens = int(num_tokens)
    if num_tokens == "search":
        return "search"
    if num_tokens == "auto":
        if not model.has_policy:
            raise ValueError("num_tokens='auto' needs a tokenizer with a trained length policy, and this one has "
                             "none: train it with `python -m adatok_vlm.training.train_policy --tokenizer DIR "
                             "--output_dir OUT` and pass OUT/model, or pass a fixed count (--num_tokens 16)")
        return "auto"
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= m:
        raise ValueError(f"num_tokens must be 'auto', 'search' or an int in 1..{m} (the tokenizer's "
                         f"num_latent_tokens), got {num_tokens!r}")
    return num_tokens


# =============================================================================================
# reading a finished cache (the DiT trainer's input)
# =============================================================================================
class TokenCache(torch.utils.data.Dataset):
    """A finished cache as a map-style data set of ``{"tokens": [L_i, D], "length", "label"}`` items.

    All tokens sit in one flat ``[sum L_i, D]`` float32 tensor read from the Arrow files (memory-mapped
    when the dataset is one file), with ``offsets [N + 1]``: item ``i`` is a view, no per-item Arrow
    decoding. ``meta`` is ``tokens.json``. Feed it to ``VarLenCollator`` through a
    ``LengthGroupedBatchSampler(cache.lengths, ...)``.
    """

    def __init__(self, path: str | Path, limit: int | None = None):
        import datasets

        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file() or not (self.path / DATASET_DIR).is_dir():
            raise FileNotFoundError(f"{self.path} is not a finished token cache (no {META_FILE} / {DATASET_DIR}/); "
                                    "build one with `python -m adatok_vlm.training.extract_tokens --tokenizer DIR "
                                    f"--output_dir {self.path}`")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        self.dataset = datasets.load_from_disk(str(self.path / DATASET_DIR))
        d = self.meta["token_dim"]
        chunks = []
        for chunk in self.dataset.data.column("tokens").chunks:
            chunks.append(chunk.flatten().flatten().to_numpy(zero_copy_only=False))
        flat = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        with warnings.catch_warnings():   # a read-only memory map; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.tokens = torch.from_numpy(flat).view(-1, d)                     # [sum L_i, D]
        self.lengths = torch.from_numpy(np.asarray(self.dataset.data.column("length"), dtype=np.int64))
        self.labels = torch.from_numpy(np.asarray(self.dataset.data.column("label"), dtype=np.int64))
        self.offsets = torch.zeros(self.lengths.numel() + 1, dtype=torch.long)
        torch.cumsum(self.lengths, 0, out=self.offsets[1:])
        if int(self.offsets[-1]) != self.tokens.shape[0]:
            raise ValueError(f"{self.path}: the lengths add up to {int(self.offsets[-1])} tokens but the dataset "
                             f"holds {self.tokens.shape[0]}")
        if limit is not None:
            self.lengths, self.labels = self.lengths[:limit], self.labels[:limit]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def __len__(self) -> int:
        return self.lengths.numel()

    def __getitem__(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"tokens": self.tokens[start:end], "length": end - start, "label": int(self.labels[i])}


# =============================================================================================
# shards
# =============================================================================================
def _shard_path(root: Path, index: int) -> Path:
    return root / SHARD_DIR / f"shard-{index:05d}.safetensors"


def _write_shard(path: Path, tokens: list[torch.Tensor], lengths: list[torch.Tensor], labels: list[torch.Tensor],
                 indices: list[torch.Tensor], skipped: int, read: int | None = None) -> None:
    """One shard: flat valid tokens ``[T, D]``, ``lengths/labels/index [n]``; written then renamed. A stream
    shard's ``index`` is the position within its stream shard and ``read`` the items it held (skipped ones too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {"tokens": torch.cat(tokens).float().contiguous(), "lengths": torch.cat(lengths).long(),
               "labels": torch.cat(labels).long(), "index": torch.cat(indices).long(), "skipped": torch.tensor(skipped)}
    if read is not None:
        tensors["read"] = torch.tensor(read)
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _collate_indexed(items):
    """``collate_images`` plus ``index [B]``: each good item's position."""
    from .data import collate_images

    batch = collate_images(items)
    batch["index"] = torch.tensor([it["index"] for it in items if isinstance(it, dict)], dtype=torch.long)
    return batch


def _images(dataset, data: DataConfig, processor, start: int, end: int, batch_size: int, preloaded):
    """Batches ``(pixel_values [B, 3, H, W] in [0, 1], labels [B], source index [B], skipped)`` of rows start..end."""
    if preloaded is not None:
        for lo in range(start, end, batch_size):
            ix = list(range(lo, min(lo + batch_size, end)))
            batch = preloaded.batch(ix)
            yield batch["pixel_values"], batch["labels"], torch.tensor(ix), 0
        return
    from .data import ImageTransformDataset, SkippedImage

    class Indexed(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            item = self.inner[i]
            return item if isinstance(item, SkippedImage) else {**item, "index": start + i}

    subset = Indexed(ImageTransformDataset(dataset.select(range(start, end)), processor))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=_collate_indexed,
                                         num_workers=resolve_num_workers(subset, data.num_workers))
    for batch in loader:
        yield batch["pixel_values"], batch["labels"], batch["index"], batch["num_skipped"]


def _stream_unit_batches(units: dict, processor, batch_size: int, num_workers: int):
    """``(s, (pixel_values, labels, positions in shard s, skipped))`` for every batch of each stream shard
    ``units[s]`` (in its order), then ``(s, None)`` once shard ``s`` is read. Up to ``max(1, num_workers)``
    shards are read at once, each in its own DataLoader worker (0: in this process, one at a time), their
    batches taken in turn."""
    from collections import deque

    from .data import SkippedImage, StreamingImageDataset

    class Positioned(StreamingImageDataset):
        def __iter__(self):   # one item per stream row, in order: its number is its position in the shard
            for number, item in enumerate(super().__iter__()):
                yield item if isinstance(item, SkippedImage) else {**item, "index": number}

    def start(s, unit):
        loader = torch.utils.data.DataLoader(Positioned(unit, processor), batch_size=batch_size,
                                             collate_fn=_collate_indexed, num_workers=1 if num_workers else 0)
        return s, iter(loader)

    pending, active = deque(units.items()), deque()
    while pending or active:
        while pending and len(active) < max(1, num_workers):
            active.append(start(*pending.popleft()))
        s, batches = active.popleft()
        batch = next(batches, None)
        if batch is None:
            yield s, None
            continue
        yield s, (batch["pixel_values"], batch["labels"], batch["index"], batch["num_skipped"])
        active.append((s, batches))


# =============================================================================================
# assembly
# =============================================================================================
def _assemble(root: Path, num_shards: int, token_dim: int, max_tokens: int, class_names: list[str] | None,
              meta: dict) -> dict:
    """Shards -> ``dataset/`` (Arrow) + ``tokens.json`` (statistics, histograms); both atomic. Stream shards
    (with ``read``) get their positions offset by the items of the shards before them; ``class_names`` None
    (a stream's integer labels without names) becomes ``"0" .. str(max label)``."""
    import datasets
    import pyarrow as pa
    from safetensors import safe_open

    if class_names is None:
        top = 0
        for s in range(num_shards):
            with safe_open(str(_shard_path(root, s)), "pt") as f:
                labels = f.get_tensor("labels")
            top = max(top, int(labels.max()) if labels.numel() else 0)
        class_names = [str(i) for i in range(top + 1)]
        meta = dict(meta, num_classes=len(class_names), class_names=class_names)

    features = datasets.Features({
        "tokens": datasets.List(datasets.List(datasets.Value("float32"), length=token_dim)),
        "length": datasets.Value("int32"),
        "label": datasets.ClassLabel(names=class_names),
        "index": datasets.Value("int64"),
    })
    stats = RunningTokenStats(token_dim)
    parts, all_lengths, all_labels, skipped, offset = [], [], [], 0, 0
    for s in range(num_shards):
        shard = load_file(str(_shard_path(root, s)))
        flat, lengths = shard["tokens"], shard["lengths"]
        skipped += int(shard["skipped"])
        if "read" in shard:   # a stream shard: position in the shard -> position in the stream
            shard["index"] = shard["index"] + offset
            offset += int(shard["read"])
        if lengths.numel() == 0:
            continue
        stats.update(flat[None], torch.tensor([flat.shape[0]]))
        all_lengths.append(lengths)
        all_labels.append(shard["labels"])
        offsets = np.concatenate([[0], np.cumsum(lengths.numpy())]).astype(np.int32)   # in tokens
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.numpy().reshape(-1), pa.float32()), token_dim)
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), inner),
                          "length": pa.array(lengths.numpy().astype(np.int32)),
                          "label": pa.array(shard["labels"].numpy()),
                          "index": pa.array(shard["index"].numpy())})
        parts.append(datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features)))
    if not parts:
        raise ValueError("no image was encoded (every image was unreadable, or the data set is empty)")
    dataset = datasets.concatenate_datasets(parts)
    lengths, labels = torch.cat(all_lengths), torch.cat(all_labels)
    histograms = LengthSampler.from_lengths(lengths, labels, len(class_names), max_tokens)

    tmp = root / f".tmp-{DATASET_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    final = root / DATASET_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    meta = dict(meta, num_items=int(lengths.numel()), num_tokens_total=int(lengths.sum()),
                mean_length=float(lengths.float().mean()), skipped_images=skipped,
                token_mean=stats.mean.tolist(), token_std=stats.std.tolist(),
                length_histograms=histograms.to_list())
    write_text_atomic(root / META_FILE, json.dumps(meta, indent=1))          # last: the cache is complete
    return meta


# =============================================================================================
# the run
# =============================================================================================
def extract(cfg: TokenExtractionConfig) -> dict:
    """Encode ``cfg.data``'s split with ``cfg.tokenizer``; returns a summary (``complete``, paths, counts)."""
    from transformers import AutoModel

    import adatok_vlm  # noqa: F401  (registers AdaTok with AutoModel)

    ec = cfg.extract
    configure_threads(ec.num_threads)
    accelerator = make_accelerator(ec.mixed_precision)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    root = Path(ec.output_dir)
    if ec.batch_size < 1 or ec.shard_size < 1:
        raise ValueError(f"extract.batch_size and extract.shard_size must be >= 1, "
                         f"got {ec.batch_size} and {ec.shard_size}")
    if not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer: no folder {cfg.tokenizer!r}; pass a trained AdaTok saved with "
                                "save_pretrained (e.g. outputs/demo/model)")
    model = AutoModel.from_pretrained(cfg.tokenizer).to(accelerator.device).eval()
    if not hasattr(model, "encode") or not hasattr(model, "num_latent_tokens"):
        raise TypeError(f"tokenizer: {cfg.tokenizer} holds a {type(model).__name__}, not an AdaTok model")
    mode = check_num_tokens(cfg.num_tokens, model)

    import datasets

    dataset = load_split(cfg.data, cfg.data.train_split, ec.seed, limit=cfg.data.limit)
    streamed, head = isinstance(dataset, datasets.IterableDataset), None
    if streamed and cfg.data.limit is not None:   # a taken stream cannot be cut into its shards: copy its head
        dataset, head = load_bounded_split(cfg.data, cfg.data.train_split, ec.seed, cfg.data.limit, "extract_tokens",
                                           "data.limit", folder=root / HEAD_DIR, accelerator=accelerator)
        streamed = False
    label_feature = (dataset.features or {}).get("label")
    processor = extraction_processor(cfg.tokenizer, model.config, cfg.data)
    preloaded = None
    if streamed:
        if cfg.data.preload:
            raise ValueError(f"data.preload: true, but data.dataset {cfg.data.dataset!r} is read as a stream (its "
                             "size is unknown); set data.preload to null or false")
        units = stream_shards(dataset)
        num_images, num_shards = None, len(units)
    else:
        if decide_preload(len(dataset), model.config.image_size, preload=cfg.data.preload,
                          preload_max_gb=cfg.data.preload_max_gb, channels=model.config.num_channels):
            from .batches import preload_images

            preloaded = preload_images(dataset, processor)
        num_images = len(preloaded) if preloaded is not None else len(dataset)
        num_shards = -(-num_images // ec.shard_size)
    if hasattr(label_feature, "names"):
        class_names = list(label_feature.names)
    elif label_feature is not None:                       # a stream's labels are counted at assembly
        class_names = None if streamed else [str(i) for i in range(int(max(dataset["label"])) + 1)]
    else:
        class_names = ["image"]                               # no labels: one class (unconditional)

    manifest = {"tokenizer": str(Path(cfg.tokenizer).resolve()), "tokenizer_fingerprint":
                model_fingerprint(cfg.tokenizer), "num_tokens": mode,
                "data": {k: v for k, v in asdict(cfg.data).items() if k != "num_workers"},
                "processor": json.loads(json.dumps(processor.to_dict(), sort_keys=True, default=str)),
                "num_source_images": num_images, "shard_size": None if streamed else ec.shard_size, "seed": ec.seed}
    if streamed:
        manifest["stream"] = {"num_shards": num_shards, "unit": "one cache shard per stream shard, in listed order"}
    if head is not None:
        manifest["stream_head"] = head
    summary = {"output_dir": str(root), "num_shards": num_shards, "complete": False}
    if (root / META_FILE).is_file() and not ec.overwrite:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        if meta.get("manifest") != manifest:
            raise ValueError(f"{root} already holds a token cache made with other settings ({root / META_FILE}); "
                             "choose another --output_dir or pass --extract.overwrite true")
        if is_main:
            print(f"{root} already holds this token cache ({meta['num_items']} items); nothing to do")
        return summary | {"complete": True, "encoded_shards": 0, "meta": meta}

    shard_root = root / SHARD_DIR
    previous = shard_root / MANIFEST
    # Every rank checks (and so fails together); only the main process cleans up and writes.
    if not ec.overwrite and previous.is_file() and json.loads(previous.read_text(encoding="utf-8")) != manifest:
        raise ValueError(f"{shard_root} holds unfinished shards made with other settings ({previous}); "
                         "choose another --output_dir or pass --extract.overwrite true")
    accelerator.wait_for_everyone()
    if is_main:
        if ec.overwrite:
            for stale in (root / META_FILE, root / DATASET_DIR, shard_root):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        shard_root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(previous, json.dumps(manifest, indent=1))
    accelerator.wait_for_everyone()

    mine = [s for s in range(rank, num_shards, world) if not _shard_path(root, s).is_file()]
    if ec.max_shards is not None:
        mine = mine[: ec.max_shards]
    todo = None if streamed else sum(min(ec.shard_size, num_images - s * ec.shard_size) for s in mine)
    if is_main:
        done = sum(1 for s in range(num_shards) if _shard_path(root, s).is_file())
        print(f"token extraction: {'a stream' if streamed else num_images} images of {cfg.data.dataset}:"
              f"{cfg.data.train_split} with {cfg.tokenizer} (num_tokens={mode}), {num_shards} shards"
              + (" (one per stream shard)" if streamed else f" of {ec.shard_size}") + f", {done} already done, "
              f"{world} process(es), device {accelerator.device}")
    bar = tqdm(total=todo, disable=not is_main, desc="encoding", unit="img", dynamic_ncols=True)
    started = time.time()

    def unit_batches():
        """``(shard, batch)`` for this rank's unfinished shards, ``(shard, None)`` when one is read."""
        if streamed:
            yield from _stream_unit_batches({s: units[s] for s in mine}, processor, ec.batch_size,
                                            resolve_num_workers(None, cfg.data.num_workers))
            return
        for s in mine:
            start, end = s * ec.shard_size, min((s + 1) * ec.shard_size, num_images)
            for batch in _images(dataset, cfg.data, processor, start, end, ec.batch_size, preloaded):
                yield s, batch
            yield s, None

    pending = {}   # shard -> (tokens, lengths, labels, indices, [skipped, read]) of shards being read
    for s, batch in unit_batches():
        tokens, lengths, labels, indices, counts = pending.setdefault(s, ([], [], [], [], [0, 0]))
        if batch is None:
            del pending[s]
            if not lengths:
                d = model.config.token_dim
                tokens, lengths, labels, indices = [torch.zeros(0, d)], [torch.zeros(0)], [torch.zeros(0)], \
                    [torch.zeros(0)]
            _write_shard(_shard_path(root, s), tokens, lengths, labels, indices, counts[0],
                         read=counts[1] if streamed else None)
            continue
        pixels, y, ix, bad = batch
        counts[0] += int(bad)
        counts[1] += pixels.shape[0] + int(bad)
        bar.update(pixels.shape[0] + int(bad))
        if pixels.shape[0] == 0:
            continue
        with accelerator.autocast():
            enc = model.encode(pixels.to(accelerator.device), num_tokens=mode)
        tokens.append(enc.tokens[enc.token_mask].float().cpu())             # [sum L_i, D] valid rows only
        lengths.append(enc.lengths.cpu())
        labels.append(y.clamp_min(0).cpu())                                 # -1 (no label) -> class 0
        indices.append(ix.cpu())
        bar.set_postfix(mean_len=f"{float(torch.cat(lengths).float().mean()):.1f}")
    bar.close()
    accelerator.wait_for_everyone()
    summary["encoded_shards"] = len(mine)
    summary["encode_s"] = time.time() - started
    if any(not _shard_path(root, s).is_file() for s in range(num_shards)):
        if is_main:
            missing = sum(1 for s in range(num_shards) if not _shard_path(root, s).is_file())
            print(f"stopped with {missing} of {num_shards} shards still to encode (extract.max_shards); "
                  "run again with the same settings to continue")
        return summary
    if is_main:
        meta = {"tokenizer": manifest["tokenizer"], "tokenizer_fingerprint": manifest["tokenizer_fingerprint"],
                "num_tokens": mode, "token_dim": int(model.config.token_dim),
                "max_tokens": int(model.num_latent_tokens), "image_size": int(model.config.image_size),
                "num_classes": None if class_names is None else len(class_names), "class_names": class_names,
                "manifest": manifest}
        meta = _assemble(root, num_shards, meta["token_dim"], meta["max_tokens"], class_names, meta)
        if not ec.keep_shards:
            shutil.rmtree(shard_root, ignore_errors=True)
        shutil.rmtree(root / HEAD_DIR, ignore_errors=True)   # the stream's copied head (data.limit), no longer needed
        print(f"token cache: {meta['num_items']} images, mean length {meta['mean_length']:.2f} of "
              f"{meta['max_tokens']}, {meta['skipped_images']} unreadable images skipped -> {root}")
        summary["meta"] = meta
    accelerator.wait_for_everyone()
    summary["complete"] = True
    return summary


def parse_args(argv: list[str] | None = None) -> TokenExtractionConfig:
    """``--config FILE`` + overrides. ``--output_dir`` / ``--seed`` (the project's short flags, which
    name the ``train`` section) land in ``extract``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(TokenExtractionConfig))
        raise SystemExit(0)
    config_path, overrides = parse_overrides(argv)
    raw = deep_merge(load_yaml(config_path) if config_path else {}, overrides)
    short = raw.pop("train", {})
    if short:
        raw["extract"] = deep_merge(raw.get("extract", {}), short)
    return fill_dataclass(TokenExtractionConfig, raw)


def main(argv: list[str] | None = None) -> dict:
    return extract(parse_args(argv))


if __name__ == "__main__":
    main()
