"""Data loading: Fashion-MNIST from IDX, natural crops, image folders with corrupt files, loaders."""

import gzip
import io
import json
import shutil
import socket
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor
from adatok_vlm.training.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    ImageTransformDataset,
    SkipCounter,
    SkippedImage,
    build_dataloader,
    collate_images,
    load_fashion_mnist,
    load_image_dataset,
    load_natural_crops,
    read_idx,
)

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test.

    ``datasets`` is also put back into its *online* configuration (conftest sets HF_HUB_OFFLINE=1), so the
    tests prove that the loaders themselves keep off the network, whatever the environment says. Attempts
    are recorded and checked at teardown, because some callers (datasets' download-count ping) swallow
    the error.
    """
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    real_connect, attempts = socket.socket.connect, []

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):  # local (AF_UNIX) sockets are multiprocessing's
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):  # name resolution comes before any connection
        attempts.append(host)
        raise socket.gaierror(f"network access attempted: {host}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_test_split_matches_the_raw_idx_files(tmp_path):
    start = time.perf_counter()
    ds = load_fashion_mnist("test", cache_dir=tmp_path)
    cold = time.perf_counter() - start
    assert len(ds) == 10_000
    assert ds.features["label"].names == list(FASHION_MNIST_CLASSES) and len(FASHION_MNIST_CLASSES) == 10
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert first["image"].size == (28, 28) and first["image"].mode == "L"
    with gzip.open(Path(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")) as f:
        raw_labels = f.read()
    with gzip.open(Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz")) as f:
        raw_images = f.read(16 + 28 * 28)
    assert first["label"] == raw_labels[8]  # the first byte after the 8-byte header
    np.testing.assert_array_equal(np.asarray(first["image"]), np.frombuffer(raw_images[16:], np.uint8).reshape(28, 28))
    assert np.bincount(ds["label"], minlength=10).tolist() == [1000] * 10

    # The second load reads the atomically written cache (one entry, no temporary left behind).
    start = time.perf_counter()
    again = load_fashion_mnist("test", cache_dir=tmp_path)
    assert time.perf_counter() - start < max(1.0, cold / 2)
    assert [p.name.startswith("fashion_mnist-test-") for p in tmp_path.iterdir()] == [True]
    assert again._fingerprint == ds._fingerprint and again[9999]["label"] == ds[9999]["label"]
    limited = load_fashion_mnist("test", limit=5, cache_dir=False)
    assert len(limited) == 5 and limited["label"] == ds.select(range(5))["label"]


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split.*'valid'"):
        load_fashion_mnist("valid", root=tmp_path)


def _idx_bytes(array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(">u1").tobytes()


def test_read_idx_parses_and_rejects_corrupt_files(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(_idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(good, expected_ndim=3), images)
    np.testing.assert_array_equal(read_idx(good, max_items=1), images[:1])

    short = tmp_path / "short.gz"  # valid gzip, but fewer data bytes than the header announces
    short.write_bytes(gzip.compress(_idx_bytes(images)[:-5]))
    with pytest.raises(ValueError, match="short.gz.*truncated or corrupt"):
        read_idx(short)
    cut = tmp_path / "cut.gz"  # the gzip stream itself is cut
    cut.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.gz.*truncated or corrupt"):
        read_idx(cut)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(ValueError, match="magic.*not an IDX file"):
        read_idx(magic)
    with pytest.raises(ValueError, match="expected an IDX file with 1 dimension"):
        read_idx(good, expected_ndim=1)


# ---------------------------------------------------------------------------------------------
# Natural crops
# ---------------------------------------------------------------------------------------------


def test_natural_crops_are_deterministic_varied_rgb_and_from_several_photos():
    crops = load_natural_crops(48, crop_size=24, seed=0)
    assert len(crops) == 48
    assert crops.features["label"].names[:3] == ["astronaut", "chelsea", "coffee"]
    images = [np.asarray(row["image"]) for row in crops]
    assert all(row["image"].mode == "RGB" and row["image"].size == (24, 24) for row in crops)
    assert len(set(crops["label"])) >= 4
    # Varied: (almost) all distinct -- a rare pair of flat black crops from retina's border may coincide.
    assert len({im.tobytes() for im in images}) >= 45 and np.std([im.mean() for im in images]) > 5

    same = load_natural_crops(48, crop_size=24, seed=0)
    assert same["label"] == crops["label"]
    assert all(np.array_equal(np.asarray(a["image"]), b) for a, b in zip(same, images))
    assert same._fingerprint == crops._fingerprint
    other = load_natural_crops(48, crop_size=24, seed=1)
    assert sum(np.array_equal(np.asarray(a["image"]), b) for a, b in zip(other, images)) == 0
    # Crop i does not depend on how many crops were asked for.
    prefix = load_natural_crops(10, crop_size=24, seed=0)
    assert all(np.array_equal(np.asarray(a["image"]), b) for a, b in zip(prefix, images[:10]))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_crops": 0}, "num_crops"), ({"num_crops": 2, "scale_range": (0, 1)}, "scale_range"),
     ({"num_crops": 2, "scale_range": (0.5, 2.0)}, "scale_range"), ({"num_crops": 2, "crop_size": 0}, "crop_size"),
     ({"num_crops": 2, "seed": -1}, "seed"), ({"num_crops": 2, "seed": "a"}, "seed")],
)
def test_natural_crops_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_natural_crops(**kwargs)


def test_natural_crops_splits_are_independent_streams(no_network):
    train = load_image_dataset("natural_crops", num_crops=8, crop_size=8, seed=5)
    assert train["label"] == load_natural_crops(8, crop_size=8, seed=5)["label"]
    test = load_image_dataset("natural_crops", split="test", num_crops=8, crop_size=8, seed=5)
    again = load_image_dataset("natural_crops", split="test", num_crops=8, crop_size=8, seed=5)
    assert [np.asarray(r["image"]).tobytes() for r in test] == [np.asarray(r["image"]).tobytes() for r in again]
    assert not any(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(train, test))
    assert len(load_image_dataset("natural_crops", split="validation", num_crops=3, crop_size=8)) == 3
    with pytest.raises(ValueError, match="split.*'holdout'"):
        load_image_dataset("natural_crops", split="holdout", num_crops=3)


# ---------------------------------------------------------------------------------------------
# Image folders with corrupt files, the torch dataset, collate, loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes of two valid PNGs each, plus a truncated PNG, a zero-byte .png and text named .jpg."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    valid = {}
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            array = rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(_png(array))
            valid[array.tobytes()] = label
    good = _png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("this is not a picture\n")
    return root, valid


def _expected_pixels(processor, valid):
    """Processed pixel sums of the valid images -> label, to recognise them in batches."""
    out = {}
    for raw, label in valid.items():
        array = np.frombuffer(raw, np.uint8)
        height = array.size // 30
        pixels = processor(array.reshape(height, 10, 3), return_tensors="pt")["pixel_values"][0]
        out[round(float(pixels.sum()), 3)] = label
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder_skips_and_counts_corrupt_files(messy_folder, tmp_path, num_workers, no_network):
    root, valid = messy_folder
    ds = load_image_dataset(root, cache_dir=tmp_path / "hf")
    assert len(ds) == 7 and ds.features["label"].names == ["cat", "dog"]
    processor = AdaTokImageProcessor(size=8)
    loader = build_dataloader(ds, processor, batch_size=3, shuffle=True, num_workers=num_workers, seed=0)
    counter, seen = SkipCounter(), {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        items = 0
        for batch in loader:
            counter.update(batch)
            pixel_values, labels = batch["pixel_values"], batch["labels"]
            assert len(labels) == pixel_values.shape[0] and pixel_values.dtype == torch.float32
            assert len(labels) == 0 or pixel_values.shape[1:] == (3, 8, 8)  # an all-bad batch is empty
            items += len(labels) + batch["num_skipped"]
            for pixels, label in zip(pixel_values, labels):
                seen.setdefault(round(float(pixels.sum()), 3), []).append(int(label))
        assert items == 7
    assert seen == {key: [label, label] for key, label in _expected_pixels(processor, valid).items()}
    assert counter.as_dict() == {"empty_file": 2, "not_an_image": 2, "truncated": 2}  # 3 per epoch, 2 epochs
    assert counter.total == 6
    summary = counter.summary()
    assert "6" in summary and "truncated=2" in summary and "empty.png" in summary
    counter.reset()
    assert counter.summary() == "skipped images: none" and counter.as_dict() == {}


def test_transform_dataset_reports_why_an_item_is_skipped(messy_folder, tmp_path):
    root, _ = messy_folder
    Image.new("RGB", (1, 5)).save(root / "cat" / "sliver.png")  # decodes, but cannot be cropped
    ds = load_image_dataset(root, cache_dir=tmp_path / "hf")
    items = ImageTransformDataset(ds, AdaTokImageProcessor(size=8))
    assert items.class_names == ["cat", "dog"]
    by_name = {Path(ds.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"]).name: items[i]
               for i in range(len(items))}
    assert isinstance(by_name["0.png"], dict) and by_name["0.png"]["pixel_values"].shape == (3, 8, 8)
    reasons = {name: item.reason for name, item in by_name.items() if isinstance(item, SkippedImage)}
    assert reasons == {"truncated.png": "truncated", "empty.png": "empty_file", "notes.jpg": "not_an_image",
                       "sliver.png": "unusable"}
    assert "sliver.png" in by_name["sliver.png"].detail


def test_collate_drops_skipped_items_and_handles_an_all_bad_batch():
    good = {"pixel_values": torch.zeros(3, 4, 4), "label": 2}
    batch = collate_images([good, SkippedImage(1, "truncated", "x.png"), None, good])
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [2, 2]
    assert batch["num_skipped"] == 2 and batch["skipped"] == {"truncated": 1, "unknown": 1}
    empty = collate_images([SkippedImage(0, "empty_file", "e.png")])
    assert empty["pixel_values"].shape[0] == 0 and empty["labels"].shape == (0,) and empty["num_skipped"] == 1


def test_dataloader_shuffles_deterministically_per_seed_and_epoch():
    ds = load_natural_crops(24, crop_size=8, seed=3)
    processor = AdaTokImageProcessor(size=8)

    def order(seed, epoch):
        loader = build_dataloader(ds, processor, batch_size=5, shuffle=True, num_workers=0, seed=seed)
        loader.set_epoch(epoch)
        return [round(float(p.sum()), 4) for batch in loader for p in batch["pixel_values"]]

    first = order(0, 0)
    assert len(first) == 24 and first == order(0, 0)
    assert first != order(1, 0) and first != order(0, 1)
    assert sorted(first) == sorted(order(0, 1))  # same items, another permutation
    in_order = build_dataloader(ds, processor, batch_size=24, shuffle=False, seed=0)
    labels = next(iter(in_order))["labels"].tolist()
    assert labels == ds["label"]
    dropped = build_dataloader(ds, processor, batch_size=5, shuffle=False, drop_last=True)
    assert len(dropped) == 4


def test_build_dataloader_settings_and_errors():
    ds = load_natural_crops(4, crop_size=8)
    loader = build_dataloader(ds, AdaTokImageProcessor(size=8), batch_size=2, num_workers=1, seed=0)
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.persistent_workers and isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    assert loader.sampler.num_replicas == 1
    with pytest.raises(ValueError, match="image_processor"):
        build_dataloader(ds, None, batch_size=2)
    with pytest.raises(ValueError, match="distributed.*init"):
        build_dataloader(ds, AdaTokImageProcessor(size=8), batch_size=2, distributed=True)
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(ds, AdaTokImageProcessor(size=8), batch_size=0)
    with pytest.raises(ValueError, match="image_column.*'img'"):
        ImageTransformDataset(ds, AdaTokImageProcessor(size=8), image_column="img")


# ---------------------------------------------------------------------------------------------
# load_image_dataset: saved datasets, the Hub cache, errors
# ---------------------------------------------------------------------------------------------


def test_load_from_disk_round_trip(tmp_path):
    crops = load_natural_crops(6, crop_size=8, seed=2)
    crops.save_to_disk(str(tmp_path / "single"))
    loaded = load_image_dataset(tmp_path / "single")
    assert loaded.features == crops.features and loaded["label"] == crops["label"]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(loaded, crops))
    datasets.DatasetDict({"train": crops, "test": crops.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_image_dataset(str(tmp_path / "dict"))) == 6
    assert len(load_image_dataset(str(tmp_path / "dict"), split="test")) == 2
    assert len(load_image_dataset(str(tmp_path / "dict"), limit=3)) == 3
    with pytest.raises(ValueError, match="split.*'valid'"):
        load_image_dataset(str(tmp_path / "dict"), split="valid")


def test_columns_are_standardised_to_image_and_label():
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])})
    raw = datasets.Dataset.from_dict({"img": [{"bytes": _png(np.zeros((4, 4, 3), np.uint8)), "path": None}],
                                      "fine_label": [1]}, features=features)
    ds = load_image_dataset(raw)
    assert ds.column_names == ["image", "label"] and ds[0]["label"] == 1


def test_missing_hub_dataset_fails_fast_without_network(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_image_dataset("nobody-here/no-such-dataset", cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "nobody-here/no-such-dataset" in message and "beforehand" in message and "load_dataset" in message
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_dataset(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(TypeError, match="spec"):
        load_image_dataset(42)


def test_hub_dataset_in_the_local_cache_loads_offline(messy_folder, tmp_path, no_network):
    """Lay out a cached Hub dataset the way ``datasets`` stores one, then load it with the network blocked."""
    root, _ = messy_folder
    for bad in ("truncated.png", "empty.png", "notes.jpg"):
        for found in root.rglob(bad):
            found.unlink()
    built = tmp_path / "built"
    load_image_dataset(root, cache_dir=built)  # an imagefolder build fills a datasets cache
    source = next(p for p in built.glob("imagefolder/*/*/*") if p.is_dir())
    target = tmp_path / "hub" / "someone___tiny_images" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    info = json.loads((source / "dataset_info.json").read_text())
    info["dataset_name"] = "tiny_images"
    for split in info["splits"].values():
        split["dataset_name"] = "tiny_images"
    (target / "dataset_info.json").write_text(json.dumps(info))
    shutil.copy(source / "imagefolder-train.arrow", target / "tiny_images-train.arrow")

    offline_before = datasets.config.HF_HUB_OFFLINE
    ds = load_image_dataset("someone/tiny_images", cache_dir=tmp_path / "hub")
    assert len(ds) == 4 and ds.features["label"].names == ["cat", "dog"]
    assert ds[0]["image"].mode == "RGB"
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # the temporary offline switch is undone


def test_preloading_an_imagefolder_skips_and_counts_bad_files(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from adatok_vlm import AdaTokImageProcessor
    from adatok_vlm.training.batches import preload_images
    from adatok_vlm.training.data import load_image_dataset

    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path / "cache"))
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            PILImage.new("RGB", (40, 40), (i * 40, 10, 200)).save(tmp_path / "imgs" / cls / f"{i}.png")
    good = (tmp_path / "imgs" / "a" / "0.png").read_bytes()
    (tmp_path / "imgs" / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "imgs" / "b" / "empty.png").write_bytes(b"")
    dataset = load_image_dataset(str(tmp_path / "imgs"), split="train")
    out = preload_images(dataset, AdaTokImageProcessor(size=32), cache=False)
    assert out.pixels.shape == (6, 3, 32, 32) and out.num_skipped == 2
    assert sorted(out.labels.tolist()) == [0, 0, 0, 1, 1, 1]
