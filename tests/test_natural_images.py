"""The held-out-photo natural data set, the natural demo's determinism, and the length/content figures."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adatok_vlm import AdaTokConfig
from adatok_vlm.training.natural_images import (
    DEFAULT_SCALES,
    NATURAL_PHOTOS,
    WALLPAPER_PACKAGES,
    find_natural_photos,
    load_natural_images,
    natural_images_dir,
)
from adatok_vlm.training.visualize import length_correlations, length_ordered_grid, order_by_length, png_sizes

SIZE = AdaTokConfig.from_preset("adatok-natural").image_size
BUNDLED = {package for _, package, _ in NATURAL_PHOTOS}


# A few crops per photo and scale keep the build quick; the demo's default is 48.
RECIPE = {"crop_size": SIZE, "crops_per_scale": 4}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One cache for the module: the demo runs below train on the set built for the split tests."""
    return tmp_path_factory.mktemp("adatok-cache")


@pytest.fixture(scope="module")
def natural(cache_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # wallpapers may be absent here: the skip test covers that
        return load_natural_images(cache_dir=cache_root / "data", **RECIPE)


def _pixels(example) -> np.ndarray:
    return np.asarray(example["image"])


def test_train_and_test_share_no_source_photo(natural):
    train, test = set(natural["train"]["source"]), set(natural["test"]["source"])
    assert train and test
    assert not train & test
    # the ClassLabel agrees with the recorded source, so no crop is mislabelled into the other split
    names = natural["train"].features["label"].names
    for split in ("train", "test"):
        labels = natural[split]["label"]
        assert {names[i] for i in labels} == set(natural[split]["source"])


def test_crops_are_rgb_in_range_of_the_preset_size_with_scale_and_flip_recorded(natural):
    for split in ("train", "test"):
        ds = natural[split]
        for index in np.linspace(0, len(ds) - 1, 40).round().astype(int):
            example = ds[int(index)]
            assert example["image"].mode == "RGB"
            assert example["image"].size == (SIZE, SIZE)
            pixels = _pixels(example)
            assert pixels.dtype == np.uint8 and pixels.std() > 0      # a real crop, not a flat fill
            assert any(abs(example["scale"] - s) < 1e-6 for s in DEFAULT_SCALES)
        # every crop is stored beside its left-right flip
        first, second = ds[0], ds[1]
        assert not first["flipped"] and second["flipped"] and first["source"] == second["source"]
        np.testing.assert_array_equal(_pixels(first)[:, ::-1], _pixels(second))
        assert set(ds["scale"]) > {1.0}                                # several scales per split


def test_the_built_set_is_cached_under_its_fingerprint(natural, cache_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = natural_images_dir(cache_dir=cache_root / "data", **RECIPE)
        stamp = (first / "dataset_dict.json").stat().st_mtime_ns
        again = natural_images_dir(cache_dir=cache_root / "data", **RECIPE)
        other = natural_images_dir(crop_size=8, crops_per_scale=1, scales=(0.5,), cache_dir=cache_root / "data")
    assert again == first and (again / "dataset_dict.json").stat().st_mtime_ns == stamp
    assert other != first


def test_without_the_wallpaper_packages_it_skips_them_clearly_and_builds_from_the_bundled_photos(tmp_path):
    empty = tmp_path / "no-wallpapers"
    empty.mkdir()
    with pytest.warns(UserWarning, match="make data") as caught:
        photos = find_natural_photos(search_roots=[empty])
    message = str(caught[0].message)
    for package in WALLPAPER_PACKAGES:
        assert package in message
    assert photos and {p.package for p in photos} <= BUNDLED
    with pytest.warns(UserWarning, match="skipping the photographs"):
        ds = load_natural_images("test", crop_size=8, crops_per_scale=1, scales=(0.5,), search_roots=[empty],
                                 cache_dir=tmp_path / "cache")
    assert len(ds) > 0 and set(ds["package"]) <= BUNDLED


@pytest.mark.parametrize("kwargs, match", [
    ({"crop_size": 0}, "crop_size"),
    ({"scales": (0.0,)}, "scales"),
    ({"scales": ()}, "scales"),
    ({"crops_per_scale": 0}, "crops_per_scale"),
    ({"seed": -1}, "seed"),
])
def test_bad_recipe_arguments_are_rejected(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        natural_images_dir(cache_dir=tmp_path, **kwargs)


def test_search_roots_must_be_a_sequence_of_folders():
    with pytest.raises(TypeError, match="search_roots"):
        find_natural_photos(search_roots="/usr/share")


def test_two_demo_stage1_runs_with_the_same_seed_give_identical_weights(natural, cache_root, tmp_path, monkeypatch):
    from adatok_vlm.training.demo import main

    monkeypatch.setenv("ADATOK_CACHE", str(cache_root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_dir = natural_images_dir(cache_dir=cache_root / "data", **RECIPE)
    tiny = ["--model.hidden_size", "32", "--model.decoder_hidden_size", "32", "--model.num_attention_heads", "2",
            "--model.decoder_num_attention_heads", "2", "--model.num_encoder_layers", "1",
            "--model.num_decoder_layers", "1"]
    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        main(["--output_dir", str(out), "--skip_policy", "true", "--data.dataset", str(data_dir),
              "--data.limit", "96", "--eval_limit", "8",
              "--train.max_steps", "3", "--train.batch_size", "8", "--train.warmup_steps", "1", "--train.seed", "7",
              "--train.save_every", "0", "--train.sample_every", "0", "--train.num_threads", "1", *tiny])
        weights.append(load_file(str(out / "model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_the_demo_refuses_a_wall_time_budget(tmp_path):
    from adatok_vlm.training.demo import main

    with pytest.raises(ValueError, match="time_budget_s"):
        main(["--output_dir", str(tmp_path), "--train.time_budget_s", "60"])
    with pytest.raises(ValueError, match="--demo"):
        main(["--demo", "cifar", "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# Fig. 1 ordering and the length/content correlations
# ---------------------------------------------------------------------------------------------

def test_order_by_length_is_a_stable_sort():
    assert order_by_length([5, 1, 3, 1, 9]).tolist() == [1, 3, 2, 0, 4]


def test_fig1_grid_sorts_by_the_policys_length_and_labels_each_image(tmp_path):
    # image i is a flat grey of level i, so the drawn order is readable back from the pixels
    levels = torch.arange(6, dtype=torch.float32) / 10 + 0.2
    images = levels.view(6, 1, 1, 1).expand(6, 3, 8, 8).clone()
    lengths = torch.tensor([7, 2, 30, 2, 11, 1])
    result = length_ordered_grid(images, lengths, tmp_path / "fig1.png", columns=3, scale=2)
    assert result["order"] == [5, 1, 3, 0, 4, 2]
    assert result["labels"] == [f"{int(lengths[i])} tok" for i in result["order"]]
    picture = np.asarray(Image.open(result["path"]).convert("RGB")).astype(int)
    cell, label_h, pad = 16, 12, 4
    for k, index in enumerate(result["order"]):
        left, top = pad + (k % 3) * (cell + pad), pad + (k // 3) * (cell + label_h + pad)
        expected = round(float(levels[index]) * 255)
        assert abs(picture[top + cell // 2, left + cell // 2, 0] - expected) <= 1     # the right image here
        label = picture[top + cell : top + cell + label_h, left : left + cell + pad]
        assert (label < 128).any()                                                   # and text under it


def test_fig1_grid_rejects_a_length_count_that_does_not_match(tmp_path):
    with pytest.raises(ValueError, match="lengths"):
        length_ordered_grid(torch.zeros(3, 3, 4, 4), [1, 2], tmp_path / "x.png")


def test_png_size_grows_with_content():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = png_sizes(torch.cat([flat, noise]))
    assert sizes[0] < sizes[1]
    buffer = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, "PNG", compress_level=9)
    assert int(sizes[1]) == len(buffer.getvalue())


def test_length_correlations_on_a_case_with_a_known_answer():
    # four images of rising complexity (more noisy rows -> bigger PNGs)
    gen = torch.Generator().manual_seed(0)
    images = torch.full((4, 3, 32, 32), 0.5)
    for i in range(4):
        images[i, :, : 8 * i] = torch.rand(3, 8 * i, 32, generator=gen)
    assert png_sizes(images).tolist() == sorted(png_sizes(images).tolist())
    same = length_correlations([1, 2, 3, 4], [2, 4, 6, 8], images)
    assert same["spearman_oracle"] == pytest.approx(1.0)
    assert same["spearman_png_size"] == pytest.approx(1.0)
    reverse = length_correlations([4, 3, 2, 1], [1, 2, 3, 4], images)
    assert reverse["spearman_oracle"] == pytest.approx(-1.0)
    assert reverse["spearman_png_size"] == pytest.approx(-1.0)
    # one swap among four: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert length_correlations([1, 2, 4, 3], [1, 2, 3, 4], images)["spearman_oracle"] == pytest.approx(0.8)
    assert length_correlations([3, 3, 3, 3], [1, 2, 3, 4], images)["num_images"] == 4
    assert np.isnan(length_correlations([3, 3, 3, 3], [1, 2, 3, 4], images)["spearman_oracle"])
