"""Frechet distances: the statistic against closed forms, FD-VGG16 on real photos, the FID Inception
built offline from a user-supplied state dict, and the ADM-style sample files."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from adatok_vlm.training.fid import (
    FID_WEIGHTS_URL,
    FeatureExtractor,
    FeatureStatistics,
    InceptionV3Features,
    RunningStatistics,
    VGG16Features,
    build_feature_extractor,
    build_fid_inception,
    export_npz,
    feature_statistics,
    frechet_distance,
    frechet_distance_between,
    generation_fd,
    read_npz,
    read_samples,
    statistics_of,
)


# --------------------------------------------------------------------------------------------------
# The statistic
# --------------------------------------------------------------------------------------------------


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form(mu1, s1, mu2, s2) -> float:
    """Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) through symmetric eigendecompositions (no sqrtm of a product)."""
    r1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))


def random_spd(rng, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def exact_samples(rng, mu, sigma, n):
    """n rows whose sample mean is exactly mu and whose unbiased sample covariance is exactly sigma."""
    z = rng.normal(size=(n, mu.shape[0]))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T      # sample cov -> I
    return z @ np.linalg.cholesky(sigma).T + mu


def test_one_dimensional_gaussians():
    # FD between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2, rel=1e-9)


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.2, 3, size=8), rng.uniform(0.2, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_general_gaussians_match_the_closed_form():
    rng = np.random.default_rng(1)
    for dim in (3, 16, 64):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-6)


def test_feature_sets_with_known_moments_match_the_closed_form():
    rng = np.random.default_rng(2)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) + 0.5
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    a, b = exact_samples(rng, mu1, s1, 400), exact_samples(rng, mu2, s2, 300)
    expected = closed_form(mu1, s1, mu2, s2)
    fitted = frechet_distance_between(feature_statistics(a), feature_statistics(torch.from_numpy(b)))
    assert fitted == pytest.approx(expected, rel=1e-3)
    running_a, running_b = RunningStatistics(dim), RunningStatistics(dim)
    for start in range(0, 400, 37):
        running_a.update(a[start : start + 37])
    for start in range(0, 300, 64):
        running_b.update(torch.from_numpy(b[start : start + 64]))
    assert frechet_distance_between(running_a.finalize(), running_b.finalize()) == pytest.approx(expected, rel=1e-3)


def test_identical_feature_sets_are_at_distance_zero_even_when_singular():
    rng = np.random.default_rng(3)
    for n, dim in ((500, 16), (40, 128)):                   # the second has a singular covariance
        feats = np.abs(rng.normal(size=(n, dim))) + 5.0       # a large mean: the running update must not cancel
        stats = feature_statistics(feats)
        fd = frechet_distance_between(stats, stats)
        assert abs(fd) < 1e-6 * np.trace(stats.sigma), (n, dim, fd)
        running = RunningStatistics(dim)
        for start in range(0, n, 7):
            running.update(feats[start : start + 7])
        r = running.finalize()
        assert np.allclose(r.mu, stats.mu, atol=1e-12) and np.allclose(r.sigma, stats.sigma, atol=1e-10)


def test_singular_product_takes_the_eps_route_and_stays_finite(monkeypatch):
    import scipy.linalg

    from adatok_vlm.training import fid

    calls = []
    real = scipy.linalg.sqrtm

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky)
    with pytest.warns(UserWarning, match="singular"):
        value = frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2), eps=1e-6)
    offset = 1e-6 * np.eye(2)
    assert len(calls) == 2 and np.allclose(calls[1], (np.eye(2) + offset) @ (4 * np.eye(2) + offset))
    assert value == pytest.approx(2 + 2 * (2 - 1) ** 2, rel=1e-5)


def test_a_large_imaginary_component_is_an_error():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance_between(FeatureStatistics(np.zeros(2), np.eye(2), 5, "vgg16"),
                                 FeatureStatistics(np.zeros(2), np.eye(2), 5, "inception"))


def test_statistics_save_and_load(tmp_path):
    rng = np.random.default_rng(4)
    stats = feature_statistics(rng.normal(size=(30, 5)), extractor="vgg16")
    loaded = FeatureStatistics.load(stats.save(tmp_path / "ref.npz"))
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 30 and loaded.extractor == "vgg16"


# --------------------------------------------------------------------------------------------------
# FD-VGG16 on real photographs
# --------------------------------------------------------------------------------------------------


def _crops(split: str, n: int) -> torch.Tensor:
    from adatok_vlm.training.data import load_image_dataset

    dataset = load_image_dataset("natural_crops", split, num_crops=n)
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                        for im in dataset["image"]]).float() / 255.0


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def test_fd_vgg16_ranks_real_below_blurred_below_noised(adatok_cache):
    extractor = build_feature_extractor("fd_vgg16", vgg_resize=None)
    assert isinstance(extractor, VGG16Features) and extractor.label == "FD-VGG16" and "FID" not in extractor.label
    a, b = _crops("train", 192), _crops("test", 192)          # two disjoint draws of crops of the same photos
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    reference = statistics_of(a, extractor, progress=False)
    fd = {name: frechet_distance_between(reference, statistics_of(images, extractor, progress=False))
          for name, images in (("real", b), ("blurred", _blur(b, 2.0)), ("noised", (b + 0.2 * noise).clamp(0, 1)))}
    assert fd["real"] < fd["blurred"] < fd["noised"], fd
    assert fd["real"] < 0.8 * fd["blurred"] and fd["blurred"] < 0.8 * fd["noised"], fd
    features = extractor(a[:4])
    assert features.shape == (4, 512) and bool((features >= 0).all())      # post-ReLU averages


def test_fd_vgg16_uses_the_real_lpips_backbone(adatok_cache):
    from safetensors.torch import load_file

    from adatok_vlm.tokenizer.lpips import convert_lpips_weights

    extractor = VGG16Features(resize=64)
    weights = load_file(str(convert_lpips_weights("vgg")))
    assert torch.equal(extractor.backbone[0].weight, weights["features.0.weight"])
    assert torch.equal(extractor.backbone[28].bias, weights["features.28.bias"])
    assert extractor(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        extractor(torch.rand(2, 1, 32, 32))


# --------------------------------------------------------------------------------------------------
# The FID Inception, offline
# --------------------------------------------------------------------------------------------------


def _reference_inception_shapes() -> dict[str, torch.Size]:
    # The pytorch-fid file holds torchvision's InceptionV3 (1008 classes, no aux head) state dict:
    # taken here from torchvision itself, independently of our network.
    from torchvision.models import inception_v3

    with torch.device("meta"):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    return {k: v.shape for k, v in net.state_dict().items()}


def _random_state_dict(with_counters: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _reference_inception_shapes().items():
        if key.endswith("num_batches_tracked"):
            if with_counters:
                state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bn.weight"):
            state[key] = torch.ones(shape)
        else:
            fan_in = max(1, int(np.prod(shape[1:])))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    st = root / "fid_inception.safetensors"
    save_file(_random_state_dict(with_counters=False), str(st))
    pth = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_random_state_dict(with_counters=True), pth)
    return {"safetensors": st, "pth": pth}


def test_fid_inception_has_the_standard_layout():
    with torch.device("meta"):
        net = build_fid_inception()
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes == _reference_inception_shapes()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960   # InceptionV3 without aux head, 1008 classes
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_fid_inception_loads_weights_strictly_and_extracts_pool3(inception_files, kind):
    extractor = build_feature_extractor("fid", inception_weights=inception_files[kind])
    assert isinstance(extractor, InceptionV3Features) and extractor.label == "FID" and extractor.dim == 2048
    stored = torch.load(inception_files["pth"], weights_only=True) if kind == "pth" else None
    if stored is not None:
        assert torch.equal(extractor.blocks[0].conv.weight, stored["Conv2d_1a_3x3.conv.weight"])
    feats = extractor(torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and bool((feats >= 0).all())
    assert not any(p.requires_grad for p in extractor.parameters())


def test_fid_inception_refuses_missing_or_wrong_weights(tmp_path, inception_files):
    with pytest.raises(FileNotFoundError) as info:
        InceptionV3Features(tmp_path / "nope.pth")
    assert FID_WEIGHTS_URL in str(info.value) and "--inception_weights" in str(info.value)
    state = _random_state_dict(with_counters=False)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight"):
        InceptionV3Features(tmp_path / "partial.safetensors")
    state = _random_state_dict(with_counters=False)
    state["fc.weight"] = torch.zeros(1000, 2048)
    save_file(state, str(tmp_path / "imagenet_head.safetensors"))
    with pytest.raises(ValueError, match="fc.weight"):
        InceptionV3Features(tmp_path / "imagenet_head.safetensors")


def test_fid_blocks_pool_as_tensorflow_does():
    # Average pools ignore the zero padding (so only border outputs differ from torchvision's block),
    # and the last block max-pools.
    from torchvision.models import inception as tv

    with torch.device("meta"):
        net = build_fid_inception()
    torch.manual_seed(0)
    ours = type(net.Mixed_5b)(192, 32).eval()
    theirs = tv.InceptionA(192, 32).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 192, 9, 9)
    a, b = ours(x), theirs(x)
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-5)
    last = type(net.Mixed_7c)(2048).eval()
    x = torch.randn(1, 2048, 3, 3)
    pooled = last.branch_pool(F.max_pool2d(x, 3, 1, 1))
    assert torch.allclose(last(x)[:, -192:], pooled, atol=1e-5)


def test_matches_pytorch_fid_when_installed(inception_files, monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    state = torch.load(inception_files["pth"], weights_only=True)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference = inception.InceptionV3([3]).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)
    ours = InceptionV3Features(inception_files["pth"])(x)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sample files (ADM's .npz, folders of PNGs) and gFID plumbing
# --------------------------------------------------------------------------------------------------


class ColourStats(FeatureExtractor):
    """A cheap extractor for plumbing tests: per-channel mean and standard deviation."""

    name, metric, label, dim = "colour", "colour", "FD-colour", 6

    def features(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], 1)


def test_npz_export_round_trips_in_adm_layout(tmp_path):
    images = torch.randint(0, 256, (5, 3, 8, 6), dtype=torch.uint8)
    path = export_npz(images, tmp_path / "samples.npz", labels=torch.arange(5))
    with np.load(path) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 6, 3)   # NHWC
        assert np.array_equal(data["arr_0"][2, 3, 4], images[2, :, 3, 4].numpy())
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(read_npz(path), images)
    floats = images.float() / 255.0
    assert torch.equal(read_npz(export_npz([floats[:2], floats[2:]], tmp_path / "f.npz")), images)
    with pytest.raises(ValueError, match=r"\.npz"):
        export_npz(images, tmp_path / "samples.png")


def test_folder_and_npz_sources_agree_and_gfd_of_a_set_with_itself_is_zero(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=g)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    npz = export_npz(images, tmp_path / "samples.npz")
    assert torch.equal(read_samples(folder), images) and torch.equal(read_samples(npz), images)
    extractor = ColourStats()
    a = statistics_of(folder, extractor, batch_size=3, progress=False)
    b = statistics_of(images, extractor, progress=False)
    assert np.allclose(a.mu, b.mu) and np.allclose(a.sigma, b.sigma)
    assert abs(generation_fd(folder, npz, extractor, progress=False)) < 1e-9
    other = torch.randint(0, 128, (10, 3, 12, 12), dtype=torch.uint8, generator=g)
    stats = statistics_of(other, extractor, progress=False)
    saved = stats.save(tmp_path / "ref_stats.npz")
    assert generation_fd(npz, saved, extractor, progress=False) == pytest.approx(
        generation_fd(npz, other, extractor, progress=False), rel=1e-9)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "zz_small.png")
    with pytest.raises(ValueError, match="one size"):
        read_samples(folder)
