"""What every image source shares, below them all: row limits, the built-data cache and the offline hub.

``data.py``'s :func:`~adatok_vlm.training.data.load_image_dataset` dispatches to the sources
(``data_sources.py``, ``natural_images.py`` and its own built-ins); they all take these helpers from
here, so the imports go one way: ``data`` -> the sources -> ``data_common``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

# Bump when the layout of a cached data set changes, so stale caches are rebuilt rather than misread.
CACHE_VERSION = 1
# A Hugging Face dataset name: ``name`` or ``namespace/name``.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ==============================================================================================
# Row limits
# ==============================================================================================

def check_limit(limit: int | None) -> int | None:
    """``limit`` if it is a positive int or None (no limit); 0, negatives and non-ints are a ``ValueError``."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected a positive int or None (no limit), got {limit!r}")
    return limit


def limit_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` rows of a map-style ``dataset`` (all of them for ``None``)."""
    if check_limit(limit) is None:
        return dataset
    return dataset.select(range(min(limit, len(dataset))))


# ==============================================================================================
# Built data sets on disk
# ==============================================================================================

def default_cache_dir() -> Path:
    """Where built data sets are cached: ``$ADATOK_CACHE/data``, else ``~/.cache/adatok-vlm/data``."""
    root = os.environ.get("ADATOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adatok-vlm")
    return Path(root) / "data"


def fingerprint(*parts: Any) -> str:
    """16 hex digits of SHA-256 over ``parts`` (JSON): the cache key of a built data set."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 ``[H, W]`` or ``[H, W, 3]`` array as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(png: list[bytes], labels: np.ndarray, class_names: Sequence[str], fingerprint: str) -> datasets.Dataset:
    """An in-memory ``Dataset`` of PNG-encoded images with a deterministic fingerprint.

    Encoding the images ourselves and handing ``datasets`` ``{"bytes": ...}`` dicts skips its per-example
    PIL round trip; the explicit fingerprint lets fingerprint-keyed caches (e.g. preloading) hit across runs.
    """
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    built = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in png], "label": labels.astype(np.int64)}, features=features
    )
    return datasets.Dataset(built.data, info=built.info, fingerprint=fingerprint)


def save_atomically(dataset: datasets.Dataset, target: Path) -> None:
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


# ==============================================================================================
# The hub, offline, and the column rule
# ==============================================================================================

@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
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


def standardise_columns(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Rename the image column to ``image`` and a lone ``ClassLabel`` column (else webdataset's ``cls``, the
    class index of a shard sample) to ``label`` (e.g. CIFAR's ``img``). Works on streams too: there a rename
    is a ``map`` that would decode every image (and raise inside ``datasets`` on a truncated one, before the
    loader can skip it), so the images are renamed undecoded and decoded again afterwards."""
    if not isinstance(dataset, datasets.IterableDataset):
        return _standardise_columns(dataset, source)
    images = [n for n, f in (dataset.features or {}).items() if isinstance(f, datasets.Image) and f.decode]
    for name in images:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    dataset = _standardise_columns(dataset, source)
    return dataset.cast_column("image", datasets.Image()) if images else dataset


def _standardise_columns(dataset, source: str):
    features = dataset.features or {}
    if "image" not in features:
        image_columns = [name for name, f in features.items() if isinstance(f, datasets.Image)]
        if not image_columns:
            raise ValueError(f"{source}: expected an image column (datasets.Image feature), got features {features}")
        dataset = dataset.rename_column(image_columns[0], "image")
    if "label" not in features:
        label_columns = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(label_columns) != 1:
            label_columns = [name for name in ("cls", "cls2") if name in features][:1]
        if len(label_columns) == 1:
            dataset = dataset.rename_column(label_columns[0], "label")
    return dataset
