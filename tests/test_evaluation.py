"""Reconstruction metrics (rMSE, PSNR, SSIM, LPIPS, rQPR, rewards) at every length mode, and the
`adatok evaluate` command end to end on a tiny model."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from adatok_vlm.tokenizer.rewards import continuous_reward, structured_reward
from adatok_vlm.training.evaluation import (
    errors_at_lengths,
    evaluate_reconstructions,
    length_label,
    markdown_table,
    mse_per_image,
    parse_length_spec,
    per_image_mse,
    psnr_from_mse,
    psnr_per_image,
    ssim_per_image,
    summarize,
)


def _photos(n: int = 6, size: int = 32) -> torch.Tensor:
    from adatok_vlm.training.data import load_image_dataset

    dataset = load_image_dataset("natural_crops", "test", num_crops=n, crop_size=size)
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                        for im in dataset["image"]])


# --------------------------------------------------------------------------------------------------
# per-image metrics against hand-computed values
# --------------------------------------------------------------------------------------------------


def test_psnr_of_known_errors():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0] += 0.1                                            # MSE 0.01 -> 20 dB
    y[1, :, :4] += 0.2                                     # MSE 0.04 / 2 = 0.02 -> 10 log10(50) dB
    assert torch.allclose(mse_per_image(y, x), torch.tensor([0.01, 0.02]), atol=1e-7)
    assert torch.allclose(psnr_per_image(y, x), torch.tensor([20.0, 10 * math.log10(50)]), atol=1e-4)
    assert float(psnr_from_mse(torch.tensor(0.0))) == 100.0    # capped for a perfect reconstruction


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = _photos(4).float() / 255.0
    assert torch.allclose(ssim_per_image(x, x), torch.ones(4), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim_per_image((x + s * noise).clamp(0, 1), x).mean().item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] < 1.0 and values[-1] < 0.6


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 30, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim_per_image(y, x)
    for i in range(3):
        expected = structural_similarity(y[i].double().numpy(), x[i].double().numpy(), channel_axis=0, data_range=1.0,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_image(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim_per_image(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


def test_length_specs_parse_and_name():
    assert parse_length_spec("8") == 8 and parse_length_spec(" auto ") == "auto"
    assert parse_length_spec("max_mse=0.02") == {"max_mse": 0.02}
    assert parse_length_spec("mean_budget=16") == {"mean_budget": 16.0}
    for bad in ("fast", "max_mse=", "budget=3"):
        with pytest.raises(ValueError, match="length mode"):
            parse_length_spec(bad)
    assert [length_label(s) for s in (4, "search", {"max_mse": 0.02}, torch.ones(3, dtype=torch.long))] == \
        ["4", "search", "max_mse=0.02", "per_sample"]


# --------------------------------------------------------------------------------------------------
# the one "error at every length"
# --------------------------------------------------------------------------------------------------


def test_errors_at_lengths_match_the_model_s_own_reconstruction_error():
    """Columns of ints, one length per image, and ``[B, K]`` all agree with ``model.reconstruction_error``
    (the model encoding at each length itself); given tokens are used instead of a second encoder pass."""
    model = tiny_model()
    x = _photos(5)
    unit = x.float() / 255.0
    m = model.num_latent_tokens
    columns = errors_at_lengths(model, x, [1, 5, m])
    assert columns.shape == (5, 3) and columns.dtype == torch.float32
    for k, length in enumerate((1, 5, m)):
        torch.testing.assert_close(columns[:, k], model.reconstruction_error(unit, length), rtol=1e-5, atol=1e-7)
    per_image = torch.tensor([1, 3, 7, m, 2])
    torch.testing.assert_close(errors_at_lengths(model, unit, per_image)[:, 0],
                               model.reconstruction_error(unit, per_image), rtol=1e-5, atol=1e-7)
    both = errors_at_lengths(model, unit, torch.stack([per_image, per_image.flip(0)], 1))
    torch.testing.assert_close(both[:, 1], model.reconstruction_error(unit, per_image.flip(0)), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(columns[:, 0], columns[:, 2])             # lengths matter
    zeros = torch.zeros_like(model.encode(unit).tokens)                   # the tokens given are the ones decoded
    torch.testing.assert_close(errors_at_lengths(model, unit, [m], tokens=zeros)[:, 0],
                               (model.decode(zeros).float() - unit).pow(2).flatten(1).mean(1))
    with pytest.raises(ValueError, match=r"lengths: expected an integer tensor \[5\]"):
        errors_at_lengths(model, unit, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths: expected an integer tensor"):
        errors_at_lengths(model, unit, torch.ones(5))
    with pytest.raises(ValueError, match="lengths: expected at least one"):
        errors_at_lengths(model, unit, [])


@pytest.mark.parametrize("variant", ["continuous", "fsq"])
def test_search_oracle_and_reconstruction_error_match_a_direct_computation(variant):
    """``encode``'s search and oracle modes and ``reconstruction_error`` all measure through
    ``AdaTokModel.errors_at_lengths``; each agrees with error curves computed here by hand (decode every
    prefix, pixel MSE), with the binary search replayed on them and the oracle's best reward taken from them.
    A large ``reward_alpha`` makes the oracle follow the error curves, so its lengths differ per image."""
    from adatok_vlm.tokenizer.allocation import binary_search_lengths

    model = tiny_model(variant, reward_alpha=1000.0, reward_beta=1e-3)
    x = torch.rand(8, 3, model.config.image_size, model.config.image_size, generator=torch.Generator().manual_seed(0))
    grid = model.length_grid
    tokens = model.encode(x).tokens
    with torch.no_grad():
        curves = torch.stack([(model.decode(tokens[:, :length]).float() - x).pow(2).flatten(1).mean(1)
                              for length in grid.tolist()], 1)                               # [8, K], by hand
    torch.testing.assert_close(model.errors_at_lengths(x, grid.tolist()), curves, rtol=0, atol=0)

    model.config.search_threshold = float(curves[:, grid.numel() // 2].median())
    columns = {int(length): k for k, length in enumerate(grid.tolist())}
    rows = torch.arange(x.shape[0])
    expected_search = binary_search_lengths(lambda lens: curves[rows, [columns[int(v)] for v in lens]], grid,
                                            model.config.search_threshold, x.shape[0])
    spec = model.reward_spec()
    expected_oracle = grid[spec(curves, grid[None].float().expand_as(curves), model.num_latent_tokens).argmax(1)]
    for mode, expected in (("search", expected_search), ("oracle", expected_oracle)):
        lengths = model.encode(x, num_tokens=mode).lengths
        assert lengths.tolist() == expected.tolist(), mode
        assert len(set(lengths.tolist())) > 1, (mode, lengths)             # the images really differ
        by_hand = curves[rows, [columns[int(v)] for v in lengths]]
        torch.testing.assert_close(model.reconstruction_error(x, mode), by_hand, rtol=0, atol=0)
    per_image = torch.tensor([1, 3, 7, 12, 2, 5, 9, 4])
    torch.testing.assert_close(model.reconstruction_error(x, per_image), curves[rows, [columns[int(v)] for v in per_image]], rtol=0, atol=0)
    torch.testing.assert_close(model.reconstruction_error(x), curves[:, -1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# data-set evaluation at every length mode
# --------------------------------------------------------------------------------------------------


def test_fixed_lengths_agree_with_the_original_helpers():
    model = tiny_model()
    pixels = _photos(10)
    lengths = [1, 4, 12]
    result = evaluate_reconstructions(model, pixels, lengths, ("rmse", "psnr", "rqpr", "reward"),
                                      thresholds=(0.02, 0.1), batch_size=4, progress=False)
    mse = per_image_mse(model, pixels, lengths, batch_size=3, progress=False)
    old = summarize(mse, lengths, threshold=0.1)
    m, c = model.num_latent_tokens, model.config
    for k, length in enumerate(lengths):
        row = result.row(str(length))
        assert row["mode"] == "fixed" and row["mean_tokens"] == length and row["std_tokens"] == 0
        assert row["rmse"] == pytest.approx(old[str(length)]["rmse"], rel=1e-5)
        assert row["psnr"] == pytest.approx(old[str(length)]["psnr"], rel=1e-5)
        assert row["rqpr@0.1"] == pytest.approx(old[str(length)]["rqpr"])
        assert row["rqpr@0.02"] == pytest.approx(float((mse[:, k] <= 0.02).float().mean()))
        lens = torch.full((10,), length)
        assert row["reward_continuous"] == pytest.approx(
            float(continuous_reward(mse[:, k], lens, m, c.reward_alpha, c.reward_beta).mean()), rel=1e-5)
        assert row["reward_structured"] == pytest.approx(
            float(structured_reward(mse[:, k], lens, m, c.reward_rl_base, c.reward_gamma).mean()), rel=1e-5)
    assert "ssim" not in result.rows[0] and "lpips" not in result.rows[0]
    assert result.per_image["4"]["rmse"].shape == (10,)


def test_per_sample_search_and_oracle_modes():
    model = tiny_model()
    pixels = _photos(8)
    per_sample = torch.tensor([1, 12, 4, 4, 12, 1, 2, 3])
    result = evaluate_reconstructions(model, pixels, [1, 2, 3, 4, 12, per_sample, "search", "oracle"],
                                      ("rmse", "reward"), batch_size=3, progress=False)
    row = result.row("per_sample")
    assert row["mode"] == "per_sample" and row["mean_tokens"] == pytest.approx(per_sample.float().mean().item())
    assert torch.equal(result.per_image["per_sample"]["tokens"], per_sample)
    fixed = {length: result.per_image[str(length)]["rmse"] for length in (1, 2, 3, 4, 12)}
    expected = torch.stack([fixed[int(length)][i] for i, length in enumerate(per_sample)])
    assert torch.allclose(result.per_image["per_sample"]["rmse"], expected, atol=1e-6)   # prefixes nest
    grid = set(model.length_grid.tolist())
    for mode in ("search", "oracle"):
        assert set(result.per_image[mode]["tokens"].tolist()) <= grid and result.row(mode)["mode"] == mode
    # The oracle keeps each image's best grid length, so no fixed length beats its mean reward.
    key = f"reward_{model.config.reward_kind}"
    assert result.row("oracle")[key] >= max(result.row(str(length))[key] for length in (1, 2, 3, 4, 12)) - 1e-6


def test_auto_and_dials_need_a_policy_and_run_with_one():
    model = tiny_model()
    pixels = _photos(4)
    with pytest.raises(ValueError, match="policy"):
        evaluate_reconstructions(model, pixels, ["auto"], ("rmse",), progress=False)
    model.enable_policy()
    result = evaluate_reconstructions(model, pixels, ["auto", {"max_mse": 0.05}, {"mean_budget": 4}], ("rmse",),
                                      progress=False)
    assert [r["label"] for r in result.rows] == ["auto", "max_mse=0.05", "mean_budget=4"]
    assert result.row("mean_budget=4")["mean_tokens"] <= 4.0
    with pytest.raises(ValueError, match="1..12"):
        evaluate_reconstructions(model, pixels, [13], ("rmse",), progress=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate_reconstructions(model, pixels, [4, 4], ("rmse",), progress=False)
    with pytest.raises(ValueError, match="unknown"):
        evaluate_reconstructions(model, pixels, [4], ("rmse", "is"), progress=False)


def test_lpips_ssim_and_fd_vgg16_columns(adatok_cache):
    from adatok_vlm.tokenizer.lpips import LPIPS
    from adatok_vlm.training.fid import build_feature_extractor

    model = tiny_model()
    pixels = _photos(6)
    result = evaluate_reconstructions(model, pixels, [2, 12], ("ssim", "lpips", "fd_vgg16"), batch_size=4,
                                      extractors={"fd_vgg16": build_feature_extractor("fd_vgg16", vgg_resize=None)},
                                      keep_samples=3, progress=False)
    x = pixels.float() / 255.0
    enc = model.encode(x)
    recon = model.decode(enc.tokens[:, :2], torch.full((6,), 2))
    expected_lpips = LPIPS("alex")(recon, x)
    assert torch.allclose(result.per_image["2"]["lpips"], expected_lpips, atol=1e-5)
    assert torch.allclose(result.per_image["2"]["ssim"], ssim_per_image(recon, x), atol=1e-5)
    assert all(r["fd_vgg16"] > 0 and math.isfinite(r["fd_vgg16"]) for r in result.rows)
    assert result.samples["2"].shape == (3, 3, 32, 32) and result.samples["original"].shape == (3, 3, 32, 32)
    assert any("FD-VGG16" in note for note in result.notes)         # 6 images << 512 dimensions
    table = markdown_table(result)
    header = table.splitlines()[0]
    assert header.startswith("| length |") and "FD-VGG16" in header and "FID" not in header   # never called FID


# --------------------------------------------------------------------------------------------------
# `adatok evaluate`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_model(num_latent_tokens=8)
    model.enable_policy()                  # an untrained policy: enough for "auto" to run end to end
    path = tmp_path_factory.mktemp("model") / "adatok"
    model.save_pretrained(path)
    return path


def test_cli_writes_every_file_it_promises(adatok_cache, saved_model, tmp_path):
    from adatok_vlm.cli import main
    from adatok_vlm.training.fid import export_npz

    samples = export_npz(_photos(8), tmp_path / "samples.npz")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(saved_model), "--data", "natural_crops", "--split", "test", "--limit", "8",
                 "--lengths", "1,2,8,auto,search,max_mse=0.05", "--metrics",
                 "rmse,psnr,ssim,lpips,rqpr,reward,fd_vgg16", "--rqpr_thresholds", "0.02,0.05", "--vgg_resize", "none",
                 "--samples", str(samples), "--out", str(out), "--batch_size", "3", "--device", "cpu",
                 "--grid_images", "4", "--no_progress"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    expected = {"metrics.json", "metrics.md", "reconstructions.png", "rmse_vs_tokens.png", "psnr_vs_tokens.png",
                "ssim_vs_tokens.png", "lpips_vs_tokens.png", "rqpr_vs_tokens.png", "reward_vs_tokens.png",
                "fd_vgg16_vs_tokens.png", "lengths_hist_auto.png", "lengths_hist_search.png",
                "lengths_hist_max_mse_0.05.png"}
    assert set(report["files"]) == expected
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [r["label"] for r in report["rows"]] == ["1", "2", "8", "auto", "search", "max_mse=0.05"]
    assert report["num_images"] == 8 and report["feature_extractors"]["fd_vgg16"]["label"] == "FD-VGG16"
    for row in report["rows"]:
        for key in ("mean_tokens", "rmse", "psnr", "ssim", "lpips", "rqpr@0.02", "rqpr@0.05", "reward_continuous",
                    "reward_structured", "fd_vgg16"):
            assert math.isfinite(row[key]), (row["label"], key)
    assert sum(report["rows"][3]["length_counts"].values()) == 8
    # The exported samples are the very images evaluated, so their gFD-VGG16 against the split is ~0.
    assert abs(report["generation"]["fd_vgg16"]) < 1e-3 * report["rows"][0]["fd_vgg16"]
    table = (out / "metrics.md").read_text()
    assert "| auto |" in table and "rQPR@0.05" in table and "gFD-VGG16" in table


def test_cli_fid_without_weights_fails_before_any_work(saved_model, tmp_path, monkeypatch):
    from adatok_vlm.training import evaluate

    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluate, "load_pixels", lambda *a, **k: pytest.fail("data loaded before the weight check"))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        evaluate.main(["--model", str(saved_model), "--data", "natural_crops", "--metrics", "rmse,fid",
                       "--out", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(ValueError, match="unknown"):
        evaluate.main(["--model", str(saved_model), "--data", "natural_crops", "--metrics", "rmse,fidd",
                       "--out", str(tmp_path / "out"), "--device", "cpu"])
