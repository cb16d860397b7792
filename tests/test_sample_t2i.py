"""``adatok sample-t2i`` (and ``sample-c2i --generator ar``) on a tiny model exported by train_vlm: the PNGs,
grids and summary it promises, with each image's token count printed and within the requested bounds."""

import json
from pathlib import Path

import pytest
from PIL import Image

from adatok_vlm import sample_t2i
from adatok_vlm.training import train_vlm

from test_train_vlm import CLASSES, assets, run_args  # noqa: F401  (the module-scoped fixture)


@pytest.fixture(scope="module")
def model_dir(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("t2i_model")
    summary = train_vlm.main(run_args(assets, out, "--max_steps", "2", "--vlm.num_flow_steps", "2"))
    return summary["model_dir"]


def test_prompts_write_pngs_a_grid_and_token_counts(model_dir, tmp_path, capsys):
    out = tmp_path / "t2i"
    summary = sample_t2i.main(["--model", model_dir, "--prompt", "a red square", "--prompt", "picture 3",
                               "--num_images", "2", "--out", str(out), "--seed", "0", "--max_image_tokens", "4",
                               "--batch_size", "3"])
    printed = capsys.readouterr().out
    records = summary["images"]
    assert len(records) == 4 and [r["prompt"] for r in records] == ["a red square"] * 2 + ["picture 3"] * 2
    for r in records:
        assert Path(r["file"]).is_file() and Image.open(r["file"]).size == (32, 32)
        assert 1 <= r["num_tokens"] <= 4
        assert f"{r['file']}  tokens={r['num_tokens']}" in printed
    assert (out / "grid.png").is_file()
    assert json.loads((out / "summary.json").read_text())["images"] == records
    # the same command and seed give the same images
    args = ["--model", model_dir, "--prompt", "a red square", "--num_images", "2", "--max_image_tokens", "4"]
    one = sample_t2i.main(args + ["--out", str(tmp_path / "one")])
    two = sample_t2i.main(args + ["--out", str(tmp_path / "two")])
    assert [r["num_tokens"] for r in one["images"]] == [r["num_tokens"] for r in two["images"]]
    for a, b in zip(one["images"], two["images"]):
        assert Image.open(a["file"]).tobytes() == Image.open(b["file"]).tobytes()


def test_exact_lengths_and_guidance(model_dir, tmp_path):
    summary = sample_t2i.main(["--model", model_dir, "--prompt", "a bag", "--num_images", "3", "--out",
                               str(tmp_path), "--num_image_tokens", "3", "--cfg", "2.0", "--steps", "2"])
    assert [r["num_tokens"] for r in summary["images"]] == [3, 3, 3]


def test_classes_all_writes_one_grid_per_class(model_dir, tmp_path):
    summary = sample_t2i.main(["--model", model_dir, "--classes", "all", "--num_images", "2", "--out", str(tmp_path),
                               "--max_image_tokens", "3"])
    assert sorted({r["class"] for r in summary["images"]}) == list(range(len(CLASSES)))
    assert {r["prompt"] for r in summary["images"]} == {"a red square", "a blue disc", "a green bar", "an apple"}
    grids = sorted(p.name for p in tmp_path.glob("grid_*.png"))
    assert grids == ["grid_00_red-square.png", "grid_01_blue-disc.png", "grid_02_green-bar.png", "grid_03_apple.png"]
    assert len(list((tmp_path / "images").glob("*.png"))) == 2 * len(CLASSES)
    from adatok_vlm.cli import main as cli   # `adatok sample-c2i --generator ar` reaches the VLM sampler

    assert cli(["sample-c2i", "--generator=ar", "--model", model_dir, "--classes", "1,apple", "--per_class", "1",
                "--out", str(tmp_path / "c2i"), "--num_steps", "2"]) == 0
    summary = json.loads((tmp_path / "c2i" / "summary.json").read_text())
    assert [r["class"] for r in summary["images"]] == [1, 3] and (tmp_path / "c2i" / "grid.png").is_file()


def test_bad_arguments(model_dir, tmp_path):
    with pytest.raises(ValueError, match="--prompt"):
        sample_t2i.main(["--model", model_dir, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--classes"):
        sample_t2i.main(["--model", model_dir, "--classes", "9", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="config.json"):
        sample_t2i.main(["--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path)])
