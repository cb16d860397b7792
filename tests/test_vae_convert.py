"""`convert-vae` and `latent-stats`: released (LDM-layout) VAE checkpoints become diffusers folders.

The checkpoints are written here: a small diffusers AutoencoderKL with random weights is renamed into the
original LDM / taming key layout by an inverse mapping written in this file (independent of the converter),
saved as a ``.ckpt`` ({"state_dict": ...} with loss keys, like SD-VAE / VA-VAE releases) or a
``.safetensors`` (under ``first_stage_model.``, like a full SD checkpoint), converted by the command, and
the converted model must encode and decode exactly like the model the weights came from.
"""

import itertools
import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from adatok_vlm.training import convert_vae as cv

# Two tiny architectures: SD-VAE's (attention only in the mid blocks) and VA-VAE's (attention also in
# the lowest-resolution level of the encoder and decoder, LDM's attn_resolutions at the latent size).
TINY_SD = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.5,
}
TINY_VA = {
    **TINY_SD,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 6, "scaling_factor": 1.0,
}
ARCHS = {"sd": TINY_SD, "va": TINY_VA}


# ----------------------------------------------------------------------------- the original layout
def _ldm_attention(rest: str) -> str:
    for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                     ("to_out.0.", "proj_out.")):
        if rest.startswith(new):
            return old + rest[len(new):]
    raise AssertionError(f"unexpected attention key {rest}")


def to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict renamed into the LDM layout (attention weights as 1x1 convs)."""
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key
        attention = False
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new, attention = f"{m[1]}.mid.attn_1.{_ldm_attention(m[2])}", True
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new, attention = f"encoder.down.{m[1]}.attn.{m[2]}.{_ldm_attention(m[3])}", True
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new, attention = f"decoder.up.{num_up - 1 - int(m[1])}.attn.{m[2]}.{_ldm_attention(m[3])}", True
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if attention and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]   # LDM's q/k/v/proj_out are 1x1 convolutions
        assert new not in out, new
        out[new] = value.clone()
    return out


def random_vae(config: dict, seed: int) -> AutoencoderKL:
    """An AutoencoderKL whose every tensor is random (norm affines and biases included)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if param.ndim == 1:
                param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
    return vae


def arch_dir(tmp_path, config: dict):
    folder = tmp_path / "arch"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    return folder


def write_checkpoint(tmp_path, vae: AutoencoderKL, config: dict, fmt: str):
    """Save ``vae`` in the LDM layout as a released file would be; returns its path."""
    ldm = to_ldm(vae.state_dict(), config)
    training_only = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
    if fmt == "ckpt":
        path = tmp_path / "vae.ckpt"
        torch.save({"state_dict": {**ldm, **training_only}, "global_step": 7, "epoch": 1}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({**{f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()},
                   "model.diffusion_model.out.weight": torch.randn(3)}, str(path))
    return path


def assert_same_vae(a: AutoencoderKL, b: AutoencoderKL, seed: int = 0, size: int = 32) -> None:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        pa, pb = a.encode(x).latent_dist, b.encode(x).latent_dist
        torch.testing.assert_close(pa.mean, pb.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(pa.logvar, pb.logvar, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.decode(pa.mean).sample, b.decode(pa.mean).sample, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- convert-vae
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("arch", ["sd", "va"])
def test_convert_vae_round_trip(tmp_path, arch, fmt):
    config = ARCHS[arch]
    source = random_vae(config, seed=1)
    checkpoint = write_checkpoint(tmp_path, source, config, fmt)
    out = tmp_path / "converted"
    cv.main(["--checkpoint", str(checkpoint), "--arch", str(arch_dir(tmp_path, config)), "--out", str(out)])
    converted = AutoencoderKL.from_pretrained(out, local_files_only=True)
    assert_same_vae(converted, source)
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_convert_vae_matches_diffusers_single_file_loading(tmp_path):
    """For SD-VAE's layout, diffusers' own loader of the same file gives the same model."""
    source = random_vae(TINY_SD, seed=2)
    checkpoint = write_checkpoint(tmp_path, source, TINY_SD, "ckpt")
    reference = AutoencoderKL.from_single_file(str(checkpoint), config=str(arch_dir(tmp_path, TINY_SD)),
                                               local_files_only=True, low_cpu_mem_usage=False)
    converted = cv.convert_vae(checkpoint, arch_dir(tmp_path, TINY_SD), tmp_path / "out")
    assert_same_vae(converted, reference, seed=3)


def test_level_attention_is_ldm_attention(tmp_path):
    """The mapped attention inside a level computes LDM's AttnBlock on the original 1x1-conv weights."""
    source = random_vae(TINY_VA, seed=4)
    ldm = to_ldm(source.state_dict(), TINY_VA)
    converted = cv.build_converted_vae(ldm, TINY_VA)
    h = torch.randn(2, 16, 8, 8)
    p = "encoder.down.2.attn.0."
    normed = torch.nn.functional.group_norm(h, 4, ldm[p + "norm.weight"], ldm[p + "norm.bias"], eps=1e-6)
    q, k, v = (torch.nn.functional.conv2d(normed, ldm[p + n + ".weight"], ldm[p + n + ".bias"]) for n in "qkv")
    b, c, hh, ww = q.shape
    weights = torch.softmax(torch.bmm(q.reshape(b, c, -1).transpose(1, 2), k.reshape(b, c, -1)) * c ** -0.5, dim=2)
    attended = torch.bmm(v.reshape(b, c, -1), weights.transpose(1, 2)).reshape(b, c, hh, ww)
    expected = h + torch.nn.functional.conv2d(attended, ldm[p + "proj_out.weight"], ldm[p + "proj_out.bias"])
    with torch.no_grad():
        got = converted.encoder.down_blocks[2].attentions[0](h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class NotATensor:
    """Any pickled object beyond tensors and plain containers (Lightning's hyper-parameters, say)."""


def test_pickled_objects_are_refused(tmp_path):
    source = random_vae(TINY_SD, seed=5)
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": to_ldm(source.state_dict(), TINY_SD), "hyper_parameters": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        cv.read_original_checkpoint(path)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    source = random_vae(TINY_VA, seed=6)
    checkpoint = write_checkpoint(tmp_path, source, TINY_VA, "ckpt")
    with pytest.raises(ValueError, match="does not match the --arch"):   # VA-VAE weights, SD-VAE layout
        cv.convert_vae(checkpoint, arch_dir(tmp_path, TINY_SD), tmp_path / "out")
    torch.save({"state_dict": {"unet.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no LDM autoencoder keys"):
        cv.read_original_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        cv.read_original_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="ending in"):
        cv.read_original_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(ValueError, match="arch"):
        cv.load_arch_config("no-such-vae")


def test_va_vae_f16d32_maps_every_key_of_the_released_layout():
    """The released VA-VAE layout (LightningDiT: ch_mult [1,1,2,2,4], 2 res blocks, attn_resolutions [16] at
    256 px, z 32) maps onto configs/vae/va-vae-f16d32 completely: no key missing, none left over."""
    config = cv.load_arch_config("va-vae-f16d32")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = vae.state_dict()
    ldm = to_ldm(state, config)
    attn_levels = sorted({m.group(1) for k in ldm if (m := re.match(r"((?:encoder\.down|decoder\.up)\.\d+)\.attn\.", k))})
    assert attn_levels == ["decoder.up.4", "encoder.down.4"]      # 256 / 2**4 = 16: the last level only
    assert {k for k in ldm if k.startswith("decoder.up.4.attn.") and k.endswith("q.weight")} == {
        f"decoder.up.4.attn.{i}.q.weight" for i in range(3)}     # num_res_blocks + 1 in the decoder
    assert ldm["encoder.conv_out.weight"].shape == (64, 512, 3, 3) and ldm["quant_conv.weight"].shape == (64, 64, 1, 1)
    converted = cv.convert_original_vae(ldm, config)
    assert set(converted) == set(state)
    assert all(tuple(converted[k].shape) == tuple(state[k].shape) for k in state)


def test_preset_architecture_matches_the_released_vae():
    from adatok_vlm.tokenizer.configuration_adatok import VAE_ARCHITECTURES

    keys = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "latent_channels")
    for preset, name in (("va-vae-f16d32", "va-vae-f16d32"), ("sd-vae-f8c4", "sd-vae-ft-ema")):
        assert {k: VAE_ARCHITECTURES[preset][k] for k in keys} == {k: cv.load_arch_config(name)[k] for k in keys}


# ----------------------------------------------------------------------------- latent-stats
def image_set(tmp_path, count: int = 5, size: int = 32):
    """A saved data set of ``count`` random RGB images; returns (its folder, the images as [N, 3, S, S] in [0, 1])."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": list(range(count))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    folder = tmp_path / "images"
    ds.save_to_disk(str(folder))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255.0
    return folder, pixels


def converted_folder(tmp_path, config: dict = TINY_VA, seed: int = 8):
    source = random_vae(config, seed=seed)
    out = tmp_path / "vae"
    cv.convert_vae(write_checkpoint(tmp_path, source, config, "ckpt"), arch_dir(tmp_path, config), out)
    return out, source


def direct_stats(vae: AutoencoderKL, pixels: torch.Tensor):
    with torch.no_grad():
        z = vae.encode(pixels.float() * 2 - 1).latent_dist.mean.double()
    return z.mean(dim=(0, 2, 3)), z.transpose(0, 1).reshape(z.shape[1], -1).std(dim=1, unbiased=False)


def stats_argv(vae_dir, data_dir, *extra):
    return ["--model.preset", "adatok-tiny", "--model.vae_path", str(vae_dir), "--data.dataset", str(data_dir),
            "--data.train_split", "train", "--batch_size", "2", "--device", "cpu", *extra]


def test_latent_stats_equal_a_direct_computation(tmp_path):
    vae_dir, source = converted_folder(tmp_path)
    data_dir, pixels = image_set(tmp_path, count=5)
    record = cv.latent_stats_main(stats_argv(vae_dir, data_dir, "--limit", "null"))
    mean, std = direct_stats(source, pixels)
    assert record["num_images"] == 5 and record["num_latent_values_per_channel"] == 5 * 8 * 8
    torch.testing.assert_close(torch.tensor(record["latent_mean"], dtype=torch.float64), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(record["latent_std"], dtype=torch.float64), std, rtol=1e-5, atol=1e-6)
    saved = json.loads((vae_dir / "config.json").read_text())
    assert saved["latents_mean"] == record["latent_mean"] and saved["latents_std"] == record["latent_std"]
    assert json.loads((vae_dir / "latent_stats.json").read_text())["latent_std"] == record["latent_std"]
    reloaded = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    assert list(reloaded.config.latents_mean) == record["latent_mean"]


def test_latent_stats_limit_measures_a_subset(tmp_path):
    vae_dir, source = converted_folder(tmp_path)
    data_dir, pixels = image_set(tmp_path, count=6)
    out = tmp_path / "stats.json"
    record = cv.latent_stats_main(stats_argv(vae_dir, data_dir, "--limit", "3", "--out", str(out),
                                             "--write_config", "false"))
    assert record["num_images"] == 3 and json.loads(out.read_text())["limit"] == 3
    assert json.loads((vae_dir / "config.json").read_text()).get("latents_mean") is None
    means = [direct_stats(source, pixels[list(subset)])[0] for subset in itertools.combinations(range(6), 3)]
    got = torch.tensor(record["latent_mean"], dtype=torch.float64)
    assert sum(torch.allclose(got, m, rtol=1e-5, atol=1e-6) for m in means) == 1


def test_channel_moments_merge_batches_exactly():
    x = torch.randn(7, 3, 4, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1) + 100
    moments = cv.ChannelMoments(3)
    for part in (x[:1], x[1:4], x[4:4], x[4:]):
        moments.update(part)
    torch.testing.assert_close(moments.mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(moments.std, x.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False))
