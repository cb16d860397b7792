"""gFID the field's way (issue 14, item 4): ADM reference batches (with and without mu/sigma), the
Inception Score and ADM's improved precision / recall from the same features, the streamed .npz
reader, feature extraction and rFID split over two real (gloo) ranks, and `adatok evaluate`
with --samples/--reference. Every .npz here is written by the test."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import save_file
from test_fid import _random_state_dict, closed_form
from torch import nn

from adatok_vlm.training.fid import (
    FeatureExtractor,
    RunningStatistics,
    all_reduce_statistics,
    compute_features,
    count_samples,
    evaluate_generation,
    export_npz,
    inception_score,
    iter_npz_batches,
    npz_image_count,
    precision_recall,
    shard_bounds,
)


class RandomConvFeatures(FeatureExtractor):
    """A small random-weight feature network with a linear 'classifier' (so IS has logits)."""

    name, metric, label, dim = "randconv", "fd_randconv", "FD-randconv", 12
    num_classes = 7

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 12, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("head", torch.randn(7, 12, generator=g))
        self.requires_grad_(False)

    def features(self, images):
        return F.relu(self.conv2(F.relu(self.conv1(2 * images - 1)))).mean(dim=(2, 3))

    def logits(self, features):
        return features @ self.head.T


def _images(n: int, seed: int, size: int = 16, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _direct(extractor, images: torch.Tensor) -> np.ndarray:
    """Features computed straight from the network, one image at a time (no batching, no files)."""
    return torch.cat([extractor(images[i : i + 1].float() / 255.0) for i in range(images.shape[0])]).double().numpy()


def _moments(feats: np.ndarray):
    return feats.mean(0), np.cov(feats, rowvar=False)


def _write_reference(path, images=None, mu=None, sigma=None, spatial_dim: int = 5):
    """An ADM-style reference batch: arr_0 (uint8 NHWC), mu/sigma and mu_s/sigma_s, no network name."""
    arrays = {}
    if images is not None:
        arrays["arr_0"] = images.permute(0, 2, 3, 1).numpy()
    if mu is not None:
        arrays.update(mu=mu, sigma=sigma, mu_s=np.zeros(spatial_dim), sigma_s=np.eye(spatial_dim))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _is_numpy(logits: np.ndarray, splits: int) -> float:
    """improved-GAN's Inception Score, written out in numpy (mean over splits)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _pr_bruteforce(ref: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision / recall from full distance matrices (the k-th neighbour after the point itself)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref, r_gen = np.sort(sq(ref, ref), axis=1)[:, k], np.sort(sq(gen, gen), axis=1)[:, k]
    precision = (sq(gen, ref) <= r_ref[None]).any(1).mean()
    recall = (sq(ref, gen) <= r_gen[None]).any(1).mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------------------
# gFID against a reference batch
# --------------------------------------------------------------------------------------------------


def test_gfid_uses_the_reference_mu_sigma_and_equals_the_direct_frechet_distance(tmp_path):
    extractor = RandomConvFeatures()
    samples, ref_images, pool = _images(40, 1), _images(30, 2, high=200), _images(50, 3, high=160)
    samples_npz = export_npz(samples, tmp_path / "samples.npz")
    # As in ADM's batches, mu/sigma describe a larger set (here `pool`) than the 30 images of arr_0.
    mu, sigma = _moments(_direct(extractor, pool))
    ref = _write_reference(tmp_path / "VIRTUAL_ref.npz", ref_images, mu, sigma)

    result = evaluate_generation(samples_npz, ref, extractor, batch_size=7, progress=False)
    feats, ref_feats = _direct(extractor, samples), _direct(extractor, ref_images)
    expected = closed_form(*_moments(feats), mu, sigma)
    assert result["fd_randconv"] == pytest.approx(expected, rel=1e-6)
    arr0_fd = closed_form(*_moments(feats), *_moments(ref_feats))
    assert abs(arr0_fd - expected) > 0.05 * expected          # the file's mu/sigma, not arr_0's, were used
    assert result["reference_statistics"] == "mu/sigma stored in VIRTUAL_ref.npz"
    assert result["num_samples"] == 40 and result["num_reference_images"] == 30
    assert result["label"] == "gFD-randconv" and result["network"] == "randconv"
    # IS from the same features' logits, and precision / recall against the arr_0 features.
    assert result["inception_score"] == pytest.approx(_is_numpy(feats @ extractor.head.double().numpy().T, 10),
                                                      rel=1e-6)
    assert result["inception_score_splits"] == 10
    assert (result["precision"], result["recall"]) == pytest.approx(_pr_bruteforce(ref_feats, feats), abs=1e-12)
    assert result["precision_recall_k"] == 3


def test_gfid_without_mu_sigma_computes_the_reference_from_its_images(tmp_path):
    extractor = RandomConvFeatures(seed=4)
    samples, ref_images = _images(25, 5), _images(20, 6, high=128)
    ref = _write_reference(tmp_path / "ref_images_only.npz", ref_images)
    result = evaluate_generation(export_npz(samples, tmp_path / "s.npz"), ref, extractor, metrics=("fd",),
                                 progress=False)
    expected = closed_form(*_moments(_direct(extractor, samples)), *_moments(_direct(extractor, ref_images)))
    assert result["fd_randconv"] == pytest.approx(expected, rel=1e-6)
    assert result["reference_statistics"] == "computed from the 20 arr_0 images of ref_images_only.npz"
    assert "precision" not in result and "inception_score" not in result


def test_reference_statistics_of_another_network_fall_back_to_the_images_or_are_refused(tmp_path):
    extractor = RandomConvFeatures()
    samples, ref_images = _images(15, 7), _images(15, 8)
    rng = np.random.default_rng(0)
    adm_mu, adm_sigma = rng.normal(size=2048), np.eye(2048)                 # ADM's pool_3 statistics: 2048-d
    ref = _write_reference(tmp_path / "adm.npz", ref_images, adm_mu, adm_sigma)
    result = evaluate_generation(samples, ref, extractor, metrics=("fd",), progress=False)
    expected = closed_form(*_moments(_direct(extractor, samples)), *_moments(_direct(extractor, ref_images)))
    assert result["fd_randconv"] == pytest.approx(expected, rel=1e-6)
    assert any("2048-d (ADM: InceptionV3 pool_3)" in note for note in result["notes"])
    with pytest.raises(ValueError, match="2048-d.*no images"):
        evaluate_generation(samples, _write_reference(tmp_path / "stats_only.npz", None, adm_mu, adm_sigma),
                            extractor, progress=False)
    labelled = tmp_path / "vgg_stats.npz"
    with open(labelled, "wb") as f:
        np.savez(f, mu=np.zeros(12), sigma=np.eye(12), extractor=np.str_("vgg16"))
    with pytest.raises(ValueError, match="vgg16 features"):
        evaluate_generation(samples, labelled, extractor, progress=False)
    with pytest.raises(ValueError, match="classifier"):
        evaluate_generation(samples, ref, _NoClassifier(), metrics=("fd", "is"), progress=False)
    with pytest.raises(ValueError, match="metrics"):
        evaluate_generation(samples, ref, extractor, metrics=("fid",), progress=False)


class _NoClassifier(RandomConvFeatures):
    num_classes = 0

    def logits(self, features):
        return FeatureExtractor.logits(self, features)


# --------------------------------------------------------------------------------------------------
# Inception Score and precision / recall on cases with known answers
# --------------------------------------------------------------------------------------------------


def test_inception_score_known_answers():
    assert inception_score(torch.zeros(50, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)   # uniform: 1
    classes = torch.arange(100) % 10                      # every split of 10 holds each of 10 classes once
    confident = 60.0 * F.one_hot(classes, 10).double()
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    same_class = 60.0 * F.one_hot(torch.zeros(40, dtype=torch.long), 5).double()
    assert inception_score(same_class, splits=4)[0] == pytest.approx(1.0, abs=1e-6)   # confident, no diversity
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 9)) * 3
    assert inception_score(logits, splits=6)[0] == pytest.approx(_is_numpy(logits, 6), rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(5, 3), splits=10)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        inception_score(torch.zeros(5))


def test_precision_recall_known_answers():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    assert precision_recall(ref, ref.copy(), block_size=7) == (1.0, 1.0)                       # identical sets
    assert precision_recall(ref, rng.normal(size=(30, 8)) + 1000.0, block_size=7) == (0.0, 0.0)  # far apart
    # Half the samples are reference points, half far away: precision exactly 1/2.
    half = np.concatenate([ref[:20], rng.normal(size=(20, 8)) + 1000.0]).astype(np.float32)
    precision, recall = precision_recall(ref, half, block_size=9)
    assert precision == 0.5 and 0.5 <= recall <= 1.0
    assert (precision, recall) == _pr_bruteforce(ref.astype(np.float64), half.astype(np.float64))
    gen = (rng.normal(size=(35, 8)) * 1.3 + 0.4).astype(np.float32)
    assert precision_recall(ref, gen, block_size=8) == pytest.approx(_pr_bruteforce(ref, gen), abs=1e-12)
    assert precision_recall(ref, gen, k=5) == pytest.approx(_pr_bruteforce(ref, gen, k=5), abs=1e-12)
    with pytest.raises(ValueError, match="N > 3"):
        precision_recall(ref[:3], gen)
    with pytest.raises(ValueError, match="one F"):
        precision_recall(ref, gen[:, :4])


# --------------------------------------------------------------------------------------------------
# Streaming the .npz and sharding
# --------------------------------------------------------------------------------------------------


def test_npz_arrays_stream_in_batches_from_any_offset(tmp_path):
    images = _images(11, 9, size=6)
    for name, save in (("plain.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        path = tmp_path / name
        with open(path, "wb") as f:
            save(f, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=np.arange(11))
        assert npz_image_count(path) == count_samples(path) == 11
        batches = list(iter_npz_batches(path, batch_size=4, start=3, stop=10))
        assert [b.shape[0] for b in batches] == [4, 3]
        assert torch.equal(torch.cat(batches), images[3:10])
        assert torch.equal(torch.cat(list(iter_npz_batches(path, batch_size=5))), images)
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as f:
        np.savez(f, arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        npz_image_count(bad)
    with pytest.raises(ValueError, match="arr_0"):
        list(iter_npz_batches(tmp_path / "plain.npz", key="samples"))


def test_shard_bounds_cover_the_set_once_in_order():
    for n, world in ((13, 2), (10, 4), (3, 5), (0, 3)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 2, 2)


def _two_rank_worker(rank: int, world: int, init_file: str, folder: str) -> None:
    """One gloo rank: features, merged statistics, gFID/IS/PR and rFID of its shard, saved for the parent."""
    import torch.distributed as dist

    from adatok_vlm.training.evaluation import evaluate_reconstructions
    from adatok_vlm.training.fid import build_feature_extractor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        extractor = RandomConvFeatures()
        feats = compute_features(f"{folder}/samples.npz", extractor, batch_size=4, progress=False)
        start, stop = shard_bounds(feats.shape[0], rank, world)
        running = RunningStatistics(extractor.dim)
        running.update(feats[start:stop])
        merged = all_reduce_statistics(running).finalize()
        generation = evaluate_generation(f"{folder}/samples.npz", f"{folder}/ref.npz", extractor, batch_size=3,
                                         progress=False)
        pixels = torch.load(f"{folder}/photos.pt", weights_only=True)
        start, stop = shard_bounds(pixels.shape[0], rank, world)
        vgg = build_feature_extractor("fd_vgg16", vgg_resize=None)
        recon = evaluate_reconstructions(tiny_model(), pixels[start:stop], [2, 8], ("rmse", "fd_vgg16"),
                                         batch_size=2, extractors={"fd_vgg16": vgg}, keep_samples=0, progress=False)
        torch.save({"feats": feats, "mu": torch.from_numpy(merged.mu), "sigma": torch.from_numpy(merged.sigma),
                    "count": merged.count, "rmse": recon.per_image["2"]["rmse"], "n": recon.num_images},
                   f"{folder}/rank{rank}.pt")
        with open(f"{folder}/rank{rank}.json", "w") as f:
            json.dump({"generation": {k: v for k, v in generation.items() if k != "notes"}, "rows": recon.rows}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_what_one_process_computes(tmp_path, adatok_cache):
    import time

    import torch.multiprocessing as mp

    from adatok_vlm.training.data import load_image_dataset
    from adatok_vlm.training.evaluation import evaluate_reconstructions
    from adatok_vlm.training.fid import build_feature_extractor

    samples = _images(13, 10)                                   # odd: the ranks hold 7 and 6
    export_npz(samples, tmp_path / "samples.npz")
    _write_reference(tmp_path / "ref.npz", _images(9, 11))
    crops = load_image_dataset("natural_crops", "test", num_crops=7, crop_size=32)
    photos = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                          for im in crops["image"]])
    torch.save(photos, tmp_path / "photos.pt")
    vgg = build_feature_extractor("fd_vgg16", vgg_resize=None)     # converts the weights once, for the ranks too

    # fork: the ranks start from this process's imports (a spawned rank re-imports torch and adatok_vlm, ~10 s of
    # CPU each on the shared cores); each still builds its own process group, extractor and model.
    ctx = mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    started = time.time()
    while not ctx.join(timeout=5):
        if time.time() - started > 300:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("a rank hung")

    extractor = RandomConvFeatures()
    one = compute_features(tmp_path / "samples.npz", extractor, batch_size=5, progress=False)
    stats = RunningStatistics(extractor.dim)
    stats.update(one)
    stats = stats.finalize()
    generation = evaluate_generation(tmp_path / "samples.npz", tmp_path / "ref.npz", extractor, progress=False)
    recon = evaluate_reconstructions(tiny_model(), photos, [2, 8], ("rmse", "fd_vgg16"), batch_size=2,
                                     extractors={"fd_vgg16": vgg}, keep_samples=0, progress=False)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        numbers = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert saved["feats"].shape == (13, extractor.dim)
        assert torch.allclose(saved["feats"], one, atol=1e-5)                  # gathered in the set's order
        assert saved["count"] == 13
        assert np.allclose(saved["mu"].numpy(), stats.mu, atol=1e-6)
        assert np.allclose(saved["sigma"].numpy(), stats.sigma, atol=1e-6)
        for key in ("fd_randconv", "inception_score", "precision", "recall"):
            assert numbers["generation"][key] == pytest.approx(generation[key], rel=1e-5, abs=1e-9), key
        assert saved["n"] == 7 and torch.allclose(saved["rmse"], recon.per_image["2"]["rmse"], atol=1e-6)
        for mine, theirs in zip(numbers["rows"], recon.rows):
            assert mine["rmse"] == pytest.approx(theirs["rmse"], rel=1e-5)
            assert mine["fd_vgg16"] == pytest.approx(theirs["fd_vgg16"], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# `adatok evaluate --samples ... --reference ...`
# --------------------------------------------------------------------------------------------------


def test_cli_gfid_with_the_fid_inception_reports_fid_is_and_precision_recall(tmp_path):
    from adatok_vlm.training.evaluate import main
    from adatok_vlm.training.fid import InceptionV3Features

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.safetensors"
    save_file(_random_state_dict(with_counters=False), str(weights))        # random weights: no download here
    inception = InceptionV3Features(weights)
    samples, ref_images = _images(6, 12, size=24), _images(5, 13, size=24)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2048, 64))
    mu, sigma = rng.normal(size=2048) * 0.1, a @ a.T / 64 + 0.01 * np.eye(2048)   # ADM-like stored statistics
    ref = _write_reference(tmp_path / "VIRTUAL_tiny.npz", ref_images, mu, sigma)
    out = tmp_path / "gen"
    report = main(["--samples", str(export_npz(samples, tmp_path / "samples.npz")), "--reference", str(ref),
                   "--inception_weights", str(weights), "--batch_size", "4", "--is_splits", "2", "--device", "cpu",
                   "--no_progress", "--out", str(out)])
    details = report["generation"]["details"]["fid"]
    feats = _direct(inception, samples)
    assert report["generation"]["fid"] == pytest.approx(closed_form(*_moments(feats), mu, sigma), rel=1e-5)
    logits = feats @ inception.fc_weight.double().numpy().T                 # pool_3 times W, no bias
    assert details["inception_score"] == pytest.approx(_is_numpy(logits, 2), rel=1e-5)
    pr = _pr_bruteforce(_direct(inception, ref_images), feats)
    assert (details["precision"], details["recall"]) == pytest.approx(pr, abs=1e-12)
    assert details["network"] == "inception" and "InceptionV3 pool_3" in details["network_description"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["generation"]["fid"] == pytest.approx(report["generation"]["fid"])
    text = (out / "metrics.md").read_text()
    assert "gFID:" in text and "Inception Score (2 splits" in text and "precision / recall (k=3" in text
    assert "features: InceptionV3 pool_3" in text and "mu/sigma stored in VIRTUAL_tiny.npz" in text


def test_cli_gfd_vgg16_is_the_labelled_offline_stand_in(tmp_path, adatok_cache, capsys):
    from adatok_vlm.training.evaluate import main
    from adatok_vlm.training.fid import build_feature_extractor

    samples, ref_images = _images(8, 14, size=32), _images(8, 15, size=32)
    rng = np.random.default_rng(3)
    ref = _write_reference(tmp_path / "adm_ref.npz", ref_images, rng.normal(size=2048), np.eye(2048))
    report = main(["--samples", str(export_npz(samples, tmp_path / "s.npz")), "--reference", str(ref),
                   "--metrics", "fd_vgg16,pr", "--vgg_resize", "none", "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    vgg = build_feature_extractor("fd_vgg16", vgg_resize=None)
    feats, ref_feats = _direct(vgg, samples), _direct(vgg, ref_images)
    details = report["generation"]["details"]["fd_vgg16"]
    assert details["fd_vgg16"] == pytest.approx(closed_form(*_moments(feats), *_moments(ref_feats)), rel=1e-4)
    assert (details["precision"], details["recall"]) == pytest.approx(_pr_bruteforce(ref_feats, feats), abs=1e-12)
    assert "inception_score" not in details and "fid" not in report["generation"]
    assert "gFD-VGG16:" in printed and "not FID" in printed and "gFID" not in printed
    assert "InceptionV3 pool_3" in printed                      # why the file's mu/sigma were not used


def test_cli_refuses_what_it_cannot_measure(tmp_path):
    from adatok_vlm.training.evaluate import main

    ref = _write_reference(tmp_path / "r.npz", _images(4, 1))
    with pytest.raises(ValueError, match="Inception Score needs the FID Inception"):
        main(["--samples", str(ref), "--reference", str(ref), "--metrics", "fd_vgg16,is"])
    with pytest.raises(ValueError, match="--samples and --reference"):
        main(["--samples", str(ref)])
    with pytest.raises(ValueError, match="reconstruction metrics need --model"):
        main(["--samples", str(ref), "--reference", str(ref), "--metrics", "fid,rmse"])


# --------------------------------------------------------------------------------------------------
# rFID over a split that is streamed rather than preloaded
# --------------------------------------------------------------------------------------------------


def test_streamed_split_measures_what_the_preloaded_split_measures(tmp_path, adatok_cache):
    from adatok_vlm.training.evaluate import main

    model = tiny_model(num_latent_tokens=8)
    model.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--data", "natural_crops", "--split", "test", "--limit", "6",
              "--lengths", "2,8", "--metrics", "rmse,fd_vgg16", "--vgg_resize", "none", "--batch_size", "4",
              "--device", "cpu", "--no_progress", "--grid_images", "2"]
    preloaded = main([*common, "--out", str(tmp_path / "a")])
    streamed = main([*common, "--out", str(tmp_path / "b"), "--preload", "false", "--num_workers", "0"])
    assert preloaded["preloaded"] and not streamed["preloaded"]
    assert streamed["num_images"] == preloaded["num_images"] == 6
    for a, b in zip(preloaded["rows"], streamed["rows"]):
        assert b["rmse"] == pytest.approx(a["rmse"], rel=1e-6)
        assert b["fd_vgg16"] == pytest.approx(a["fd_vgg16"], rel=1e-6)
    assert (tmp_path / "b" / "reconstructions.png").is_file()
    assert math.isfinite(streamed["rows"][0]["fd_vgg16"])
