"""Data at ImageNet scale: its folder layouts and label files, webdataset shards, disjoint reading by
ranks x DataLoader workers, the preload decision, the field's natural-image transforms, EXIF orientation."""

import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor
from adatok_vlm.training.batches import ResumableBatchSampler
from adatok_vlm.training.data import (
    EpochTaggedBatchSampler,
    ImageTransformDataset,
    NaturalImageTransform,
    StreamingImageDataset,
    adm_center_crop,
    build_dataloader,
    build_stream_loader,
    collate_images,
    decide_preload,
    decode_image,
    decoded_size_gb,
    default_num_workers,
    expand_shard_pattern,
    load_image_dataset,
    read_label_file,
)

from test_data import no_network  # noqa: F401  (the fixture: any network attempt fails the test)

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(path: Path, value: int, size=(14, 10)) -> None:
    """A horizontal ramp starting at ``value``, so crops and flips change the pixels."""
    ramp = (value + 15 * np.arange(size[0])) % 256
    Image.fromarray(np.tile(ramp.astype(np.uint8)[None, :, None], (size[1], 1, 3))).save(path, format="JPEG", quality=95)


def _paths_and_labels(ds) -> list[tuple[str, int]]:
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [(Path(row["image"]["path"]).name, row["label"]) for row in raw]


@pytest.fixture
def imagenet(tmp_path):
    """``root/train/<wnid>/*.JPEG`` (2 per class) and a flat ``root/val/`` of 8 images; returns the root and
    the true wnid of every val file."""
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 40 * c + i)
    (root / "val").mkdir()
    truth = {}
    for i in range(8):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        truth[name] = WNIDS[(3 * i + 1) % 3]
        _jpeg(root / "val" / name, 30 * i)
    return root, truth


def _write_label_file(root: Path, truth: dict, kind: str) -> Path:
    if kind == "kaggle_csv":  # where Kaggle's release puts it: beside ILSVRC/, three levels up
        path = root.parents[2] / "LOC_val_solution.csv"
        rows = [f"{Path(n).stem},{w} 12 34 56 78 {w} 1 2 3 4" for n, w in truth.items()]
        path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif kind == "text_wnid":
        path = root / "val.txt"
        path.write_text("".join(f"{n} {w}\n" for n, w in truth.items()))
    else:  # text_index: Caffe's val.txt, an index into the sorted wnids
        path = root / "val.txt"
        path.write_text("".join(f"{n} {WNIDS.index(w)}\n" for n, w in truth.items()) + "\n")
    return path


def _read_all(loader, epoch):
    loader.set_epoch(epoch)
    keys, labels = [], []
    for batch in loader:
        assert batch["num_skipped"] == 0
        keys += batch["keys"]
        labels += batch["labels"].tolist()
    return keys, labels


@pytest.mark.parametrize("kind", ["kaggle_csv", "text_wnid", "text_index"])
def test_imagenet_flat_val_with_a_label_file_is_labelled_and_read_disjointly(imagenet, kind):
    root, truth = imagenet
    _write_label_file(root, truth, kind)
    val = load_image_dataset(root, split="val")
    assert val.features["label"].names == WNIDS  # the train classes, in sorted order
    assert {name: WNIDS[label] for name, label in _paths_and_labels(val)} == truth
    train = load_image_dataset(root, split="train")
    assert sorted(_paths_and_labels(train)) == sorted((f"{w}_{i}.JPEG", c) for c, w in enumerate(WNIDS) for i in range(2))

    # 2 ranks x 2 real DataLoader workers: per epoch, every val image once, none twice, with its label.
    processor = AdaTokImageProcessor(size=8)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = build_dataloader(val, processor, batch_size=3, shuffle=True, num_workers=2, seed=5,
                                      rank=rank, world_size=2)
            keys, labels = _read_all(loader, epoch)
            seen += keys
            expected = [val.features["label"].names.index(truth[_paths_and_labels(val)[k][0]]) for k in keys]
            assert labels == expected
        assert sorted(seen) == list(range(len(val)))


def test_imagenet_val_in_class_folders_and_missing_labels(imagenet, tmp_path):
    root, truth = imagenet
    _write_label_file(root, truth, "text_wnid")
    (root / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")  # 7 images lack a label
    with pytest.raises(ValueError, match="label_file.*no label for 7 of the 8"):
        load_image_dataset(root, split="val")
    with pytest.raises(ValueError, match=r"val.txt:1: expected 'filename label'"):
        (root / "val.txt").write_text("a b c\n")
        read_label_file(root / "val.txt", WNIDS)

    other = tmp_path / "foldered"
    for wnid in WNIDS:
        (other / "train" / wnid).mkdir(parents=True)
        _jpeg(other / "train" / wnid / "t.JPEG", 1)
    (other / "val" / WNIDS[2]).mkdir(parents=True)  # val holds only the last class: labels still index train's
    _jpeg(other / "val" / WNIDS[2] / "v.JPEG", 2)
    val = load_image_dataset(other, split="validation")
    assert val.features["label"].names == WNIDS and _paths_and_labels(val) == [("v.JPEG", 2)]


def _write_shards(folder: Path, num_shards: int, per_shard: int, prefix: str = "train") -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    labels, k = {}, 0
    for s in range(num_shards):
        with tarfile.open(folder / f"{prefix}-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                key, label = f"img{k:05d}", (7 * k) % 10
                buffer = io.BytesIO()
                Image.fromarray(np.full((10, 12, 3), 20 * (k % 12), np.uint8)).save(buffer, format="JPEG")
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                labels[key] = label
                k += 1
    return labels


@pytest.mark.parametrize("num_shards", [4, 3])
def test_webdataset_shards_are_labelled_and_read_disjointly_by_2_ranks_x_2_workers(tmp_path, num_shards, no_network):
    labels = _write_shards(tmp_path / "shards", num_shards, per_shard=3)
    pattern = str(tmp_path / "shards" / f"train-{{000000..{num_shards - 1:06d}}}.tar")
    assert expand_shard_pattern(pattern) == sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    for spec in (tmp_path / "shards", pattern):
        stream = load_image_dataset(spec)
        assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == num_shards
        assert {row["__key__"]: row["label"] for row in stream} == labels

    processor = AdaTokImageProcessor(size=8)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = build_stream_loader(load_image_dataset(pattern), processor, batch_size=2, rank=rank,
                                         world_size=2, num_workers=2, shuffle_buffer=4, seed=3, epoch=epoch)
            keys, got = _read_all_stream(loader)
            assert got == [labels[k] for k in keys]
            seen += keys
        # 4 shards: whole shards per rank, split among its workers; 3 shards: every rank reads all three
        # and keeps every other example. Either way, each image exactly once per epoch.
        assert sorted(seen) == sorted(labels)


def _read_all_stream(loader):
    keys, labels = [], []
    for batch in loader:
        keys += batch["keys"]
        labels += batch["labels"].tolist()
    return keys, labels


def test_a_stream_resumes_at_its_state_dict_without_workers(tmp_path):
    _write_shards(tmp_path / "shards", 2, per_shard=4)
    stream = StreamingImageDataset(load_image_dataset(tmp_path / "shards"), AdaTokImageProcessor(size=8))
    full = [item["key"] for item in stream]
    iterator, first = iter(stream), []
    for _ in range(3):
        first.append(next(iterator)["key"])
    state = stream.state_dict()
    resumed = StreamingImageDataset(load_image_dataset(tmp_path / "shards"), AdaTokImageProcessor(size=8))
    resumed.load_state_dict(state)
    assert first + [item["key"] for item in resumed] == full


def test_a_split_above_preload_max_gb_is_never_preloaded_and_asking_is_an_error(imagenet):
    root, _ = imagenet
    train = load_image_dataset(root, split="train")
    assert decoded_size_gb(len(train), 256) == pytest.approx(6 * 3 * 256 * 256 / 1e9)
    assert decoded_size_gb(1_281_167, 256) == pytest.approx(251.9, abs=0.1)  # ImageNet train, uint8
    assert decide_preload(len(train), 256, preload_max_gb=1e-6) is False
    assert decide_preload(len(train), 256, preload=None, preload_max_gb=1.0) is True
    assert decide_preload(len(train), 256, preload=False, preload_max_gb=1.0) is False
    with pytest.raises(ValueError, match=r"preload: True.*0.00118 GB.*6 images.*preload_max_gb=1e-06"):
        decide_preload(len(train), 256, preload=True, preload_max_gb=1e-6)
    with pytest.raises(ValueError, match="preload: True.*stream"):
        decide_preload(None, 256, preload=True)
    with pytest.raises(ValueError, match="preload_max_gb"):
        decide_preload(6, 256, preload_max_gb=-1)
    with pytest.raises(ValueError, match="preload: True with a random per-item training transform"):
        decide_preload(6, 8, preload=True, random_transform=True)
    assert decide_preload(6, 8, random_transform=True) is False  # it fits, but would freeze one crop per image
    assert 0 <= default_num_workers() <= 4


def _columns_image(width=40, height=20) -> Image.Image:
    """Every column a different grey (left dark, right bright), so crops and flips are visible."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=-1))


def test_natural_transforms_center_crop_at_evaluation_and_crop_flip_only_in_training():
    image, size = _columns_image(), 8
    evaluation = NaturalImageTransform(size, train=False, seed=0)
    outs = [evaluation.transform(image, key=k, epoch=e) for k in range(6) for e in range(2)]
    assert all(torch.equal(outs[0], o) for o in outs)  # no randomness at evaluation
    # ADM: 40x20 -> BOX-halved once to 20x10 (20 >= 2 * 8, 10 < 16), BICUBIC to 16x8, centre 8 columns.
    halved = image.resize((20, 10), Image.Resampling.BOX).resize((16, 8), Image.Resampling.BICUBIC)
    centre = np.asarray(halved)[:, 4:12].astype(np.float32) / 255
    assert torch.allclose(outs[0], torch.from_numpy(centre).permute(2, 0, 1), atol=1e-6)
    assert np.array_equal(np.asarray(adm_center_crop(image, size)), np.asarray(halved)[:, 4:12])

    training = NaturalImageTransform(size, train=True, seed=0)
    crops = [training.transform(image, key=k) for k in range(40)]
    left_to_right = [bool(c[0, 0, 0] < c[0, 0, -1]) for c in crops]
    assert any(left_to_right) and not all(left_to_right)  # some flipped, some not
    starts = {round(float(c[0, 0].min()), 3) for c in crops}
    assert len(starts) > 3  # crops at several positions
    assert torch.equal(training.transform(image, key=3, epoch=1), training.transform(image, key=3, epoch=1))
    assert any(not torch.equal(training.transform(image, key=k, epoch=0), training.transform(image, key=k, epoch=1))
               for k in range(10))
    resized = NaturalImageTransform(size, train=True, seed=0, scale=(0.2, 1.0)).transform(image, key=0)
    assert resized.shape == (3, size, size)
    with pytest.raises(ValueError, match="scale"):
        NaturalImageTransform(size, train=True, scale=(0.0, 1.0))


def test_seeded_training_crops_do_not_depend_on_the_number_of_workers(imagenet):
    root, _ = imagenet
    train = load_image_dataset(root, split="train")
    transform = NaturalImageTransform(8, train=True, seed=1)

    def epoch_pixels(num_workers, epoch):
        loader = build_dataloader(train, transform, batch_size=2, shuffle=True, num_workers=num_workers, seed=1)
        loader.set_epoch(epoch)
        return {k: p for b in loader for k, p in zip(b["keys"], b["pixel_values"])}

    serial, parallel = epoch_pixels(0, 1), epoch_pixels(2, 1)
    assert sorted(serial) == list(range(6)) and all(torch.equal(serial[k], parallel[k]) for k in serial)
    first = epoch_pixels(2, 0)  # the epoch reaches the persistent workers: other crops/flips per epoch
    assert any(not torch.equal(first[k], parallel[k]) for k in first)
    assert ImageTransformDataset(train, transform)[(1, 4)]["pixel_values"].shape == (3, 8, 8)

    # The trainers' resumable sampler, tagged with its epoch: new crops each epoch, the same ones on resume.
    items = ImageTransformDataset(train, transform)
    sampler = EpochTaggedBatchSampler(ResumableBatchSampler(len(train), 2, seed=1, drop_last=False))

    def batches(epoch, start=0):
        sampler.set_position(epoch, start)
        loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, collate_fn=collate_images, num_workers=2)
        return [(b["keys"], b["pixel_values"]) for b in loader]

    epoch0, epoch1, resumed = batches(0), batches(1), batches(1, start=1)
    assert len(epoch1) == 3 and [k for k, _ in resumed] == [k for k, _ in epoch1[1:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, epoch1[1:]))
    by_key = {k: p for keys, pix in epoch0 for k, p in zip(keys, pix)}
    assert any(not torch.equal(by_key[k], p) for keys, pix in epoch1 for k, p in zip(keys, pix))


@pytest.mark.parametrize("spec", ["imagenet", "shards", "natural_crops"])
def test_limit_zero_is_an_error_naming_limit(imagenet, tmp_path, spec):
    root, _ = imagenet
    _write_shards(tmp_path / "shards", 1, per_shard=2)
    target = {"imagenet": root, "shards": tmp_path / "shards", "natural_crops": "natural_crops"}[spec]
    with pytest.raises(ValueError, match=r"limit: expected a positive int or None.*got 0"):
        load_image_dataset(target, limit=0)
    if spec != "natural_crops":
        assert len(list(load_image_dataset(target, limit=1))) == 1


def _sideways_jpeg(path: Path, height: int = 10) -> np.ndarray:
    """Write a phone-style JPEG: stored 20 wide x ``height`` high, left half red, right half blue, EXIF
    orientation 6 ("rotate 90 degrees clockwise to display"), so upright it is ``height`` wide x 20 high with
    red on top."""
    stored = np.zeros((height, 20, 3), np.uint8)
    stored[:, :10, 0], stored[:, 10:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return stored


def _red_on_top(pixel_values: torch.Tensor) -> bool:
    """``[3, S, S]`` in [0, 1]: the upper half red and the lower half blue (upright), not left/right."""
    top, bottom = pixel_values[:, : pixel_values.shape[1] // 2], pixel_values[:, pixel_values.shape[1] // 2 + 1:]
    # (sideways, both halves hold as much red as blue; JPEG and resizing blur the rows near the middle)
    return bool(top[0].mean() - bottom[0].mean() > 0.5 and bottom[2].mean() - top[2].mean() > 0.5)


def test_an_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = _sideways_jpeg(path)
    for value in (str(path), path.read_bytes(), {"bytes": None, "path": str(path)}, Image.open(path)):
        upright = np.asarray(decode_image(value).convert("RGB")).astype(int)
        assert upright.shape == (20, 10, 3)
        assert upright[:8, :, 0].mean() > 200 and upright[:8, :, 2].mean() < 50  # red on top
        assert upright[12:, :, 2].mean() > 200 and upright[12:, :, 0].mean() < 50  # blue below
    plain = tmp_path / "plain.jpg"
    Image.fromarray(stored).save(plain, format="JPEG")
    assert decode_image(str(plain)).size == (20, 10)  # no orientation tag: untouched


def test_an_exif_rotated_jpeg_trains_upright_through_the_natural_transform_and_the_dataset(tmp_path):
    """The training path, not only ``decode_image``: a lazily opened PIL image given straight to
    :class:`NaturalImageTransform` (evaluation crop and training crop), and a folder data set read by
    ``load_image_dataset`` through ``ImageTransformDataset`` with either transform, come out upright."""
    root = tmp_path / "photos" / "train" / "phone"
    root.mkdir(parents=True)
    _sideways_jpeg(root / "a.jpg", height=20)   # square: every crop holds the whole picture, flips keep it
    for train in (False, True):
        transform = NaturalImageTransform(8, train=train, seed=0)
        with Image.open(root / "a.jpg") as image:                 # not decoded, orientation still in EXIF
            assert _red_on_top(transform(image)["pixel_values"][0])
        items = ImageTransformDataset(load_image_dataset(tmp_path / "photos", split="train"), transform)
        assert _red_on_top(items[0]["pixel_values"])
    processed = ImageTransformDataset(load_image_dataset(tmp_path / "photos", split="train"),
                                      AdaTokImageProcessor(size=8, resize_mode="pad"))
    assert _red_on_top(processed[0]["pixel_values"])


def test_streaming_a_local_parquet_folder_and_an_imagenet_folder(imagenet, tmp_path, no_network):
    """``streaming=True`` (the hub path, tested on local sources since nothing here reaches a network)."""
    root, truth = imagenet
    _write_label_file(root, truth, "text_wnid")
    val = load_image_dataset(root, split="val")
    expected = {name: label for name, label in _paths_and_labels(val)}
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i in range(2):  # two files: two stream shards, one per rank
        part = val.select(range(4 * i, 4 * i + 4))
        part.cast_column("image", datasets.Image(decode=False)).map(
            lambda row: {"image": {"bytes": Path(row["image"]["path"]).read_bytes(), "path": Path(row["image"]["path"]).name}}
        ).cast_column("image", datasets.Image()).to_parquet(str(folder / f"part-{i}.parquet"))
    stream = load_image_dataset(folder, streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 2
    names = []
    for rank in range(2):
        loader = build_stream_loader(stream, AdaTokImageProcessor(size=8), batch_size=3, rank=rank, world_size=2,
                                     num_workers=2)
        for batch in loader:
            assert batch["num_skipped"] == 0 and batch["pixel_values"].shape[1:] == (3, 8, 8)
            names += batch["labels"].tolist()
    assert sorted(names) == sorted(expected.values())
    crops = load_image_dataset("natural_crops", streaming=True, num_crops=4, crop_size=8)  # built-ins stay local
    assert isinstance(crops, datasets.IterableDataset) and len(list(crops)) == 4
    from_folder = load_image_dataset(root, split="val", streaming=True)
    assert isinstance(from_folder, datasets.IterableDataset)
    assert sorted(row["label"] for row in from_folder) == sorted(expected.values())
