"""Stage 2's reward table at scale: a seeded subset of the training data, measured through the evaluation
transform, in chunks that survive an interruption, and read through the DataLoader path."""

import io
import warnings

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from adatok_vlm.training.batches import PreloadedImages, collate_preloaded
from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.data import ImageTransformDataset, collate_images
from adatok_vlm.training.data_setup import build_image_processor, epoch_batches
from adatok_vlm.training.reward_table import measure_reward_table, measure_shared
from adatok_vlm.training.train_policy import (PolicyTrainingConfig, _reward_tables, load_tokenizer_for_policy,
                                              table_rows)

from conftest import tiny_model


def test_table_rows_are_a_seeded_disjoint_draw_over_the_whole_split():
    """Not the first rows: a class-by-class listing (100 classes x 10 images here) is covered throughout."""
    rows, val = table_rows(1000, 200, 50, seed=3)
    assert len(rows) == 200 and len(val) == 50 and not set(rows) & set(val)
    classes = {i // 10 for i in rows}
    assert len(classes) > 80 and max(rows) > 900 and min(val) < 500
    assert (rows, val) == table_rows(1000, 200, 50, seed=3)
    assert rows != table_rows(1000, 200, 50, seed=4)[0]
    bigger, same_val = table_rows(1000, 400, 50, seed=3)
    assert set(rows) <= set(bigger) and same_val == val        # a larger table extends a smaller one
    assert table_rows(10, None, 3, seed=0)[0] == sorted(set(range(10)) - set(table_rows(10, None, 3, seed=0)[1]))
    with pytest.raises(ValueError, match="val_size"):
        table_rows(10, None, 10, seed=0)


def _policy_model():
    model = tiny_model("continuous", num_latent_tokens=8)
    model.enable_policy()
    return model.eval()


def _preloaded(n=20):
    g = torch.Generator().manual_seed(0)
    return PreloadedImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g))


def _loader(data, collate):
    return lambda index_batches: epoch_batches(data, collate, index_batches, 0)()


def test_an_interrupted_measurement_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch):
    """Chunks of 8 rows, batches of 4: a KeyboardInterrupt in the first decode of chunk 2 leaves chunk 1 on
    disk; the rerun measures only chunks 2 and 3 and gives the table measured in one go."""
    model, data, acc = _policy_model(), _preloaded(), Accelerator(cpu=True)
    grid, k = model.policy.grid, model.policy.grid.numel()
    rows = [19, 3, 7, 0, 12, 5, 8, 1, 2, 15, 11, 4, 6, 9, 10, 13, 14, 16, 17]       # any order, 19 rows
    whole, _ = measure_shared(acc, tmp_path / "a" / "train.safetensors", {"m": 1}, model,
                              _loader(data, collate_preloaded), rows, 4, grid, "whole", chunk_size=8)
    assert whole.rows.tolist() == rows and whole.rl.shape == (19, k)
    direct = measure_reward_table(model, [data.batch(rows)["pixel_values"]], grid)
    assert torch.allclose(whole.rl, direct.rl, rtol=1e-4, atol=1e-7)
    assert torch.allclose(whole.features, direct.features, atol=1e-5)

    decode, calls = model.decode, {"n": 0, "stop_at": 2 * k + 1}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", counted)
    path = tmp_path / "b" / "train.safetensors"
    with pytest.raises(KeyboardInterrupt):
        measure_shared(acc, path, {"m": 1}, model, _loader(data, collate_preloaded), rows, 4, grid, "cut",
                       chunk_size=8)
    parts = path.with_name("train.parts")
    assert not path.exists() and sorted(p.name for p in parts.iterdir()) == ["chunk-000000.safetensors"]
    calls.update(n=0, stop_at=-1)
    resumed, seconds = measure_shared(acc, path, {"m": 1}, model, _loader(data, collate_preloaded), rows, 4, grid,
                                      "resume", chunk_size=8)
    assert calls["n"] == 3 * k and seconds > 0                    # chunks 2 (two batches) and 3 (one batch)
    assert torch.equal(resumed.rl, whole.rl) and torch.equal(resumed.features, whole.features)
    assert torch.equal(resumed.rows, whole.rows) and not parts.exists()
    calls.update(n=0)
    again, seconds = measure_shared(acc, path, {"m": 1}, model, _loader(data, collate_preloaded), rows, 4, grid,
                                    "cached", chunk_size=8)
    assert calls["n"] == 0 and seconds == 0.0 and torch.equal(again.rl, whole.rl)


def test_a_chunk_of_another_subset_is_measured_again(tmp_path, monkeypatch):
    """A left-over part of a different row list (same meta, same chunk number) is not reused."""
    model, data, acc = _policy_model(), _preloaded(), Accelerator(cpu=True)
    grid, k = model.policy.grid, model.policy.grid.numel()
    path = tmp_path / "train.safetensors"
    decode, calls = model.decode, {"n": 0}

    def stop_in_chunk_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", stop_in_chunk_two)
    with pytest.raises(KeyboardInterrupt):
        measure_shared(acc, path, {"m": 1}, model, _loader(data, collate_preloaded), list(range(8)), 4, grid, "a",
                       chunk_size=4)
    monkeypatch.setattr(model, "decode", decode)
    other = list(range(10, 18))
    table, _ = measure_shared(acc, path, {"m": 1}, model, _loader(data, collate_preloaded), other, 4, grid, "b",
                              chunk_size=4)
    direct = measure_reward_table(model, [data.batch(other)["pixel_values"]], grid)
    assert torch.allclose(table.rl, direct.rl, rtol=1e-4, atol=1e-7)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_undecodable_image_is_left_out_and_the_rest_keep_their_rows(tmp_path):
    """Decoded in DataLoader workers (the ``data.num_workers`` path); the corrupt file (row 2) is dropped."""
    images = [{"bytes": _png(i), "path": None} for i in range(6)]
    images[2] = {"bytes": b"this is not an image", "path": None}
    raw = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    model, acc = _policy_model(), Accelerator(cpu=True)
    processor = build_image_processor(model.config, fill_dataclass(PolicyTrainingConfig, {}).data, train=False)
    data = ImageTransformDataset(raw, processor)
    load = lambda index_batches: epoch_batches(data, collate_images, index_batches, 1)()   # noqa: E731
    with pytest.warns(UserWarning, match="1 of 6 images could not be decoded"):
        table, _ = measure_shared(acc, tmp_path / "t.safetensors", {}, model, load, list(range(6)), 4,
                                  model.policy.grid, "skip", chunk_size=4)
    assert table.rows.tolist() == [0, 1, 3, 4, 5]
    good = torch.stack([data[i]["pixel_values"] for i in (0, 1, 3, 4, 5)])
    direct = measure_reward_table(model, [good], model.policy.grid)
    assert torch.allclose(table.rl, direct.rl, rtol=1e-4, atol=1e-7)


def test_the_trainer_tables_use_the_evaluation_transform_and_a_new_seed_measures_anew(tmp_path):
    """``_reward_tables`` with random-crop + flip training transforms: the table is the evaluation
    transform's (equal to a direct measurement of those images, and repeatable), held out rows are
    disjoint, the same config reads it back, and another ``train.table_seed`` draws and measures anew."""
    folder = tmp_path / "tokenizer"
    tiny_model("continuous", num_latent_tokens=8).save_pretrained(folder)
    model = load_tokenizer_for_policy(str(folder), {}).eval()
    acc = Accelerator(cpu=True)

    def config(**train):
        return fill_dataclass(PolicyTrainingConfig, {
            "tokenizer": str(folder),
            "data": {"dataset": "natural_crops", "num_crops": 40, "transforms": "natural", "flip": True,
                     "crop_scale": [0.3, 0.6], "num_workers": 0},
            "train": {"output_dir": str(tmp_path / "run"), "reward_table": True, "table_size": 12, "val_size": 6,
                      "table_chunk_size": 5, "seed": 0, **train}})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # "the training augmentation is not applied"
        table, val, seconds = _reward_tables(config(), model, acc)
        assert seconds > 0 and len(table) == 12 and len(val) == 6
        assert not set(table.rows.tolist()) & set(val.rows.tolist())
        cfg = config()
        from adatok_vlm.training.data_setup import load_split

        raw = load_split(cfg.data, cfg.data.train_split, cfg.train.seed)
        data = ImageTransformDataset(raw, build_image_processor(model.config, cfg.data, train=False))
        x = torch.stack([data[i]["pixel_values"] for i in table.rows.tolist()])
        direct = measure_reward_table(model, [x], model.policy.grid)
        assert torch.allclose(table.rl, direct.rl, rtol=1e-4, atol=1e-7)
        assert torch.allclose(table.features, direct.features, atol=1e-5)
        again, _, seconds = _reward_tables(config(), model, acc)
        assert seconds == 0.0 and torch.equal(again.rl, table.rl)
        other, other_val, seconds = _reward_tables(config(table_seed=5), model, acc)
        assert seconds > 0 and other.rows.tolist() != table.rows.tolist()
        assert other_val.rows.tolist() != val.rows.tolist()
