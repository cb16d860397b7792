"""`adatok sample-c2i` writes every promised file (PNGs, named grid, length histogram, ADM .npz) for a
tiny DiT + AdaTok, with balanced classes, histogram lengths and seeded, reproducible output."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

from adatok_vlm import AdaTokDiT, AdaTokDiTConfig
from adatok_vlm.cli import main as cli
from adatok_vlm.generator.configuration_dit import class_names_from_config
from adatok_vlm.sample_c2i import parse_classes

NAMES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2i")
    adatok = tiny_model(num_latent_tokens=8)
    adatok.save_pretrained(root / "tokenizer")
    hist = [[0, 0, 4, 0, 0, 0, 0, 0],                 # class 0: always 3 tokens
            [0, 0, 0, 0, 1, 1, 0, 0],                 # class 1: 5 or 6
            [1, 0, 0, 0, 0, 0, 0, 3]]                 # class 2: 1 or 8
    torch.manual_seed(0)
    config = AdaTokDiTConfig.from_preset("dit-tiny", token_dim=adatok.config.token_dim, max_tokens=8, num_classes=3,
                                         length_histograms=hist, id2label=dict(enumerate(NAMES)))
    AdaTokDiT(config).save_pretrained(root / "dit")
    return root


def run(models, out, *extra):
    code = cli(["sample-c2i", "--dit", str(models / "dit"), "--tokenizer", str(models / "tokenizer"),
                "--num_steps", "3", "--out", str(out), *extra])
    assert code == 0


def test_writes_every_promised_file(models, tmp_path):
    run(models, tmp_path, "--classes", "all", "--per_class", "5", "--cfg_scale", "2.0", "--seed", "3",
        "--batch_size", "4")
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert len(pngs) == 15
    assert [p.name for p in pngs[:6]] == [f"{i:06d}_c0000.png" for i in range(5)] + ["000005_c0001.png"]
    assert Image.open(pngs[0]).size == (32, 32)
    npz = np.load(tmp_path / "samples_15x32x32x3.npz")
    assert npz["arr_0"].shape == (15, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [0] * 5 + [1] * 5 + [2] * 5 and npz["arr_1"].tolist() == npz["labels"].tolist()
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[7]).convert("RGB")), npz["arr_0"][7])
    lengths = npz["lengths"]
    assert set(lengths[:5]) == {3} and set(lengths[5:10]) <= {5, 6} and set(lengths[10:]) <= {1, 8}
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height >= 3 * 32 * 3 and grid.width > 5 * 32 * 3              # 3 rows of 5, names at the left
    assert Image.open(tmp_path / "lengths_hist.png").size[0] > 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_images"] == 15 and summary["by_class"]["1"]["name"] == "dog"
    assert summary["by_class"]["0"]["mean_length"] == 3.0
    assert not (tmp_path / ".parts").exists()


def test_seeded_and_fixed_lengths(models, tmp_path):
    run(models, tmp_path / "a", "--classes", "2,0", "--per_class", "2", "--seed", "7")
    run(models, tmp_path / "b", "--classes", "2,0", "--per_class", "2", "--seed", "7")
    run(models, tmp_path / "c", "--classes", "2,0", "--per_class", "2", "--seed", "8", "--num_tokens", "4")
    a, b, c = (np.load(tmp_path / d / "samples_4x32x32x3.npz") for d in "abc")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert a["labels"].tolist() == [2, 2, 0, 0]
    assert c["lengths"].tolist() == [4, 4, 4, 4] and not np.array_equal(a["arr_0"], c["arr_0"])


def test_class_arguments():
    assert parse_classes("all", 4) == [0, 1, 2, 3]
    assert parse_classes("0, 2-3", 4) == [0, 2, 3]
    for bad in ("4", "x", "", "1-9"):
        with pytest.raises(ValueError, match="--classes"):
            parse_classes(bad, 4)
    plain = AdaTokDiTConfig(token_dim=4, max_tokens=8, num_classes=3)
    assert class_names_from_config(plain) is None                             # transformers' LABEL_i defaults
