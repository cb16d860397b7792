"""Natural colour photographs that ship offline, and the crop data sets built from them.

Two builders, both reading only files already on disk (nothing is fetched):

- :func:`load_natural_crops` -- ``num_crops`` random crops of the photographs bundled inside the
  scikit-image and scikit-learn wheels (one stream per seed; every crop may come from any photo). Quick
  and always available; used by tests and small examples.
- :func:`load_natural_images` -- the held-out-photo data set the natural-image demo trains on: crops
  at several scales, and their horizontal flips, of the bundled photographs *and* of the photographs in
  Debian's ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` packages (installed by ``make
  data`` where apt is available). Whole source photos are assigned to ``train`` or ``test`` (no crop of
  a test photo is ever in training); each crop records its ``source``, ``scale`` and ``flipped``. The
  built :class:`datasets.DatasetDict` is cached with ``save_to_disk`` under a fingerprint of the recipe
  and of the source files, and :func:`natural_images_dir` returns that folder, which every trainer's
  ``data.dataset`` accepts.

Which wallpapers count as photographs was decided by looking at every image in the packages: see
:data:`WALLPAPER_PHOTOS`. ``gnome-backgrounds`` (43.x) holds only renders and drawings, so none of
its files are used.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from PIL import Image

# The shared helpers come from data_common (below data.py, which re-exports this module's loaders).
from .data_common import CACHE_VERSION, default_cache_dir, fingerprint, image_dataset, png_bytes, save_atomically

__all__ = [
    "DEFAULT_SCALES",
    "NATURAL_PHOTOS",
    "WALLPAPER_PACKAGES",
    "WALLPAPER_PHOTOS",
    "NaturalPhoto",
    "find_natural_photos",
    "load_natural_crops",
    "load_natural_images",
    "natural_images_dir",
    "natural_photo_paths",
]

# ==============================================================================================
# The catalogue of photographs
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

# Debian packages whose photographs :func:`load_natural_images` uses (``make data`` installs them).
WALLPAPER_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")

# (name, Debian package, path under a search root). Only real photographs: mate-backgrounds' nature/
# folder (its abstract/ and desktop/ folders are renders and logos) and the plasma wallpapers that are
# photos (Autumn is a painting; Altai, Canopee, Cascade, Cluster, Elarun, Flow, FlyingKonqui, Honeywave,
# IceCold, Kay, Kokkini, MilkyWay, Opal, PastelHills, Patak, SafeLanding, Shell and Volna are
# renders or drawings). Each photo's largest file is used.
WALLPAPER_PHOTOS = (
    ("mate_aqua", "mate-backgrounds", "backgrounds/mate/nature/Aqua.jpg"),
    ("mate_blinds", "mate-backgrounds", "backgrounds/mate/nature/Blinds.jpg"),
    ("mate_dune", "mate-backgrounds", "backgrounds/mate/nature/Dune.jpg"),
    ("mate_fresh_flower", "mate-backgrounds", "backgrounds/mate/nature/FreshFlower.jpg"),
    ("mate_garden", "mate-backgrounds", "backgrounds/mate/nature/Garden.jpg"),
    ("mate_green_meadow", "mate-backgrounds", "backgrounds/mate/nature/GreenMeadow.jpg"),
    ("mate_lady_bird", "mate-backgrounds", "backgrounds/mate/nature/LadyBird.jpg"),
    ("mate_rain_drops", "mate-backgrounds", "backgrounds/mate/nature/RainDrops.jpg"),
    ("mate_storm", "mate-backgrounds", "backgrounds/mate/nature/Storm.jpg"),
    ("mate_two_wings", "mate-backgrounds", "backgrounds/mate/nature/TwoWings.jpg"),
    ("mate_wood", "mate-backgrounds", "backgrounds/mate/nature/Wood.jpg"),
    ("mate_yellow_flower", "mate-backgrounds", "backgrounds/mate/nature/YellowFlower.jpg"),
    ("plasma_by_the_water", "plasma-workspace-wallpapers", "wallpapers/BytheWater/contents/images/2560x1600.jpg"),
    ("plasma_cold_ripple", "plasma-workspace-wallpapers", "wallpapers/ColdRipple/contents/images/2560x1600.jpg"),
    ("plasma_colorful_cups", "plasma-workspace-wallpapers",
     "wallpapers/ColorfulCups/contents/images/2560x1600.jpg"),
    ("plasma_darkest_hour", "plasma-workspace-wallpapers", "wallpapers/DarkestHour/contents/images/2560x1600.jpg"),
    ("plasma_evening_glow", "plasma-workspace-wallpapers", "wallpapers/EveningGlow/contents/images/2560x1600.jpg"),
    ("plasma_fallen_leaf", "plasma-workspace-wallpapers", "wallpapers/FallenLeaf/contents/images/2560x1600.jpg"),
    ("plasma_grey", "plasma-workspace-wallpapers", "wallpapers/Grey/contents/images/2560x1600.jpg"),
    ("plasma_kite", "plasma-workspace-wallpapers", "wallpapers/Kite/contents/images/2560x1600.jpg"),
    ("plasma_one_stands_out", "plasma-workspace-wallpapers",
     "wallpapers/OneStandsOut/contents/images/2560x1600.jpg"),
    ("plasma_path", "plasma-workspace-wallpapers", "wallpapers/Path/contents/images/2560x1600.jpg"),
    ("plasma_summer_1am", "plasma-workspace-wallpapers", "wallpapers/summer_1am/contents/images/2560x1600.jpg"),
)

# The held-out photos: about one in five of each source, chosen to span simple (sky, water, blur) to
# busy (foliage, texture) content so that the test split exercises short and long token lengths.
TEST_PHOTOS = frozenset({
    "coffee", "flower", "mate_lady_bird", "mate_storm", "mate_wood", "plasma_colorful_cups", "plasma_path",
    "plasma_summer_1am",
})

# Fraction of the photo's shorter side that one crop covers: 1 is a whole (centre-cropped) photo,
# 1/16 a patch of texture. A scale whose window would be smaller than the crop (upsampling) is skipped.
DEFAULT_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)
DEFAULT_SEARCH_ROOTS = ("/usr/share",)


class NaturalPhoto(NamedTuple):
    """One source photograph: its name, where it came from (a PyPI or Debian package), its file, its split."""

    name: str
    package: str
    path: Path
    split: str


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def natural_photo_paths() -> dict[str, Path]:
    """The bundled colour photographs present in this environment, by name (missing ones are left out)."""
    found = {}
    for name, package, relative in NATURAL_PHOTOS:
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            found[name] = root / relative
    return found


def find_natural_photos(search_roots: Sequence[str | os.PathLike] | None = None,
                        warn_missing: bool = True) -> list[NaturalPhoto]:
    """Every catalogued photograph on this machine: the bundled ones, then the wallpapers under ``search_roots``.

    ``search_roots`` (default ``("/usr/share",)``) are the folders the Debian paths of
    :data:`WALLPAPER_PHOTOS` are relative to; a test passes an empty folder to build without them. A
    wallpaper package with no photo found is reported in one warning that says how to install it,
    and the set is built from what is there.
    """
    roots = DEFAULT_SEARCH_ROOTS if search_roots is None else search_roots
    if isinstance(roots, (str, os.PathLike)):
        raise TypeError(f"search_roots: expected a sequence of folders, got the single path {roots!r}")
    roots = [Path(r) for r in roots]
    packages = {name: package for name, package, _ in NATURAL_PHOTOS}
    photos = [NaturalPhoto(name, packages[name], path, "test" if name in TEST_PHOTOS else "train")
              for name, path in natural_photo_paths().items()]
    missing = set()
    for name, package, relative in WALLPAPER_PHOTOS:
        hit = next((root / relative for root in roots if (root / relative).is_file()), None)
        if hit is None:
            missing.add(package)
            continue
        photos.append(NaturalPhoto(name, package, hit, "test" if name in TEST_PHOTOS else "train"))
    if missing and warn_missing:
        warnings.warn(
            f"natural images: skipping the photographs of {sorted(missing)} (not found under "
            f"{[str(r) for r in roots]}); the data set is built from the {len(photos)} photos present. "
            f"Install them with `make data` (or `apt-get install {' '.join(sorted(missing))}`).",
            stacklevel=2,
        )
    return photos


# ==============================================================================================
# Random crops of the bundled photographs (one stream, no photo split)
# ==============================================================================================

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
        png.append(png_bytes(np.asarray(crop)))
        labels[i] = source
    names = [name for name, _ in photos]
    key = fingerprint("natural_crops", CACHE_VERSION, num_crops, crop_size, seeds, (low, high), names)
    return image_dataset(png, labels, names, key)


# ==============================================================================================
# The held-out-photo data set: every photo's crops at several scales, and their flips
# ==============================================================================================

def _check_recipe(crop_size, scales, crops_per_scale, seed) -> tuple[int, tuple[float, ...], int, int]:
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
        raise ValueError(f"crop_size: expected a positive int, got {crop_size!r}")
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales: expected a sequence of fractions in (0, 1], got {scales!r}") from None
    if not scales or any(not 0.0 < s <= 1.0 for s in scales):
        raise ValueError(f"scales: expected a non-empty sequence of fractions in (0, 1], got {scales!r}")
    if isinstance(crops_per_scale, bool) or not isinstance(crops_per_scale, int) or crops_per_scale < 1:
        raise ValueError(f"crops_per_scale: expected a positive int, got {crops_per_scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    return crop_size, scales, crops_per_scale, int(seed)


def _photo_crops(photo: NaturalPhoto, crop_size: int, scales: tuple[float, ...], crops_per_scale: int,
                 seed: int) -> dict[str, list]:
    """One photo's crops: ``crops_per_scale`` uniform positions per scale, each also flipped left-right.

    The photo is first reduced (antialiased) so its shorter side is ``crop_size / min(scales)``, which
    makes every scale's window a plain box resample and keeps big wallpapers cheap. Positions come from
    a generator seeded by ``(seed, photo name)``, so a photo's crops do not depend on which other photos
    are installed.
    """
    with Image.open(photo.path) as image:
        rgb = image.convert("RGB")
    short = min(rgb.size)
    target = crop_size / min(scales)
    if short > target:
        factor = target / short
        rgb = rgb.resize((max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
                         Image.Resampling.LANCZOS)
    width, height = rgb.size
    rng = np.random.default_rng([seed, *photo.name.encode()])
    rows: dict[str, list] = {"png": [], "scale": [], "flipped": []}
    for scale in scales:
        side = scale * min(width, height)
        if side < crop_size:      # would upsample: this photo is too small for this scale
            continue
        for _ in range(crops_per_scale):
            u, v = rng.random(2)
            x0, y0 = u * (width - side), v * (height - side)
            crop = rgb.resize((crop_size, crop_size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
            for flipped, view in ((False, crop), (True, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
                rows["png"].append(png_bytes(np.asarray(view)))
                rows["scale"].append(scale)
                rows["flipped"].append(flipped)
    return rows


def _build(photos: list[NaturalPhoto], crop_size: int, scales: tuple[float, ...], crops_per_scale: int,
           seed: int) -> datasets.DatasetDict:
    names = [p.name for p in photos]
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=names), "source": datasets.Value("string"),
        "package": datasets.Value("string"), "scale": datasets.Value("float32"), "flipped": datasets.Value("bool"),
    })
    splits = {}
    for split in ("train", "test"):
        columns: dict[str, list] = {key: [] for key in features}
        for index, photo in enumerate(photos):
            if photo.split != split:
                continue
            try:
                rows = _photo_crops(photo, crop_size, scales, crops_per_scale, seed)
            except Exception as err:  # an unreadable file costs one source photo, not the data set
                warnings.warn(f"natural images: skipping {photo.name!r} ({photo.path}): {err}")
                continue
            count = len(rows["png"])
            columns["image"] += [{"bytes": b, "path": None} for b in rows["png"]]
            columns["label"] += [index] * count
            columns["source"] += [photo.name] * count
            columns["package"] += [photo.package] * count
            columns["scale"] += rows["scale"]
            columns["flipped"] += rows["flipped"]
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def natural_images_dir(
    crop_size: int = 32,
    scales: Sequence[float] = DEFAULT_SCALES,
    crops_per_scale: int = 48,
    seed: int = 0,
    search_roots: Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Build (once) and return the ``save_to_disk`` folder of the held-out-photo natural data set.

    The folder holds a ``DatasetDict`` with ``train`` and ``test`` splits and columns ``image`` (RGB,
    ``crop_size`` square), ``label`` (the source photo as a ``ClassLabel``), ``source``, ``package``,
    ``scale`` (fraction of the photo's shorter side the crop covers, see :data:`DEFAULT_SCALES`) and
    ``flipped``. Pass it as any trainer's ``data.dataset``. It is keyed by a fingerprint of the recipe
    and of every source file's path, size and modification time, under ``cache_dir`` (default
    :func:`~adatok_vlm.training.data_common.default_cache_dir`), so installing the wallpapers builds a new set.
    Raises ``FileNotFoundError`` when a split would have no photo at all.
    """
    crop_size, scales, crops_per_scale, seed = _check_recipe(crop_size, scales, crops_per_scale, seed)
    photos = find_natural_photos(search_roots)
    for split in ("train", "test"):
        if not any(p.split == split for p in photos):
            raise FileNotFoundError(
                f"natural images: no {split} photograph found (bundled with scikit-image/scikit-learn, or "
                f"from {list(WALLPAPER_PACKAGES)}); install the package's data extra or run `make data`"
            )
    stats = [(p.name, str(p.path), p.path.stat().st_size, p.path.stat().st_mtime_ns) for p in photos]
    key = fingerprint("natural_images", CACHE_VERSION, crop_size, scales, crops_per_scale, seed, stats)
    target = Path(default_cache_dir() if cache_dir is None else cache_dir) / f"natural_images-{crop_size}px-{key}"
    if not (target / "dataset_dict.json").is_file():
        save_atomically(_build(photos, crop_size, scales, crops_per_scale, seed), target)
    return target


def load_natural_images(split: str | None = None, **kwargs) -> datasets.Dataset | datasets.DatasetDict:
    """The held-out-photo natural data set (``split`` ``"train"`` / ``"test"``, or ``None`` for both).

    Keyword arguments are those of :func:`natural_images_dir`. Memory-mapped from its cache.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split: expected 'train', 'test' or None, got {split!r}")
    loaded = datasets.load_from_disk(str(natural_images_dir(**kwargs)))
    return loaded if split is None else loaded[split]
