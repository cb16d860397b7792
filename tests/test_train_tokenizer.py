"""Stage-1 training: the loop learns, resumes exactly, stops on non-finite losses, exports for AutoModel."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.engine import NonFiniteLossError
from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig, main, train

SMALL_MODEL = {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
               "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
               "num_latent_tokens": 8}


def config(tmp_path, **train):
    raw = {
        "model": dict(SMALL_MODEL),
        "data": {"dataset": "natural_crops", "num_crops": 256, "preload": True},
        "train": {"output_dir": str(tmp_path), "max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0,
                  "lr_schedule": "constant", "log_every": 1, "sample_every": 0, "save_every": 2, "seed": 3,
                  "num_threads": 2, **train},
    }
    return fill_dataclass(TokenizerTrainingConfig, raw)


def losses(out_dir):
    rows = [json.loads(l) for l in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_twenty_steps_of_adatok_tiny_lower_the_loss(tmp_path):
    cfg = fill_dataclass(TokenizerTrainingConfig, {
        "model": {"preset": "adatok-tiny"},
        "data": {"dataset": "natural_crops", "num_crops": 512, "preload": True},
        "train": {"output_dir": str(tmp_path), "max_steps": 20, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2,
                  "log_every": 1, "sample_every": 10, "save_every": 10, "seed": 0},
    })
    summary = train(cfg)
    curve = losses(tmp_path)
    assert len(curve) == 20
    assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:4]) / 4, curve
    assert (tmp_path / "samples" / "step-00000010.png").is_file()
    model = transformers.AutoModel.from_pretrained(summary["model_dir"])
    processor = transformers.AutoImageProcessor.from_pretrained(summary["model_dir"])
    assert type(model).__name__ == "AdaTokModel" and processor.size == 32
    assert (tmp_path / "tensorboard").is_dir()


def test_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    train(config(straight, max_steps=4))
    resumed = tmp_path / "resumed"
    train(config(resumed, max_steps=2))
    summary = main([*_flags(config(resumed, max_steps=4, resume="auto"))])
    assert summary["steps"] == 4
    a = load_file(str(straight / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    oa = load_file(str(straight / "checkpoints" / "step-00000004" / "optimizer.optim.safetensors"))
    ob = load_file(str(resumed / "checkpoints" / "step-00000004" / "optimizer.optim.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert losses(straight)[2:] == losses(resumed)[2:]


def _flags(cfg):
    import dataclasses

    flags = []
    for section in ("data", "train"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if value is not None:
                flags += [f"--{section}.{key}", json.dumps(value)]
    for key, value in cfg.model.items():
        flags += [f"--model.{key}", json.dumps(value)]
    return flags


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, monkeypatch):
    from adatok_vlm.tokenizer import modeling_adatok

    real_forward = modeling_adatok.AdaTokModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(modeling_adatok.AdaTokModel, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 2") as info:
        train(config(tmp_path, max_steps=6, save_every=0))
    assert info.value.step == 2
    assert Path(info.value.checkpoint).name == "step-00000002"
    assert json.loads((Path(info.value.checkpoint) / "trainer_state.json").read_text())["step"] == 2


def test_perceptual_and_gan_losses_train_with_two_optimizers(tmp_path, monkeypatch):
    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path / "cache"))
    cfg = config(tmp_path, max_steps=3, save_every=3)
    cfg.loss.perceptual_weight = 0.1
    cfg.loss.perceptual_net = "alex"
    cfg.loss.gan_weight = 0.1
    cfg.loss.gan_start_step = 1
    cfg.loss.disc_base_channels = 8
    cfg.loss.disc_num_layers = 2
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert (ckpt / "discriminator.safetensors").is_file() and (ckpt / "disc_optimizer.optim.json").is_file()
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_pixel_loss_on_the_decoded_image_is_logged_and_trains(tmp_path):
    cfg = config(tmp_path, max_steps=3, save_every=0)
    cfg.loss.pixel_weight = 0.5
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    for r in rows:
        assert r["loss"] == pytest.approx(r["recon_loss"] + 0.5 * r["pixel_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# eq. 5's L_recon: pixel-level L2 (the paper) or latent L2
# --------------------------------------------------------------------------------------------------
def _vae_config(tmp_path, reconstruction=None):
    from conftest import TINY_VAE

    cfg = config(tmp_path, max_steps=2, save_every=0, export=False)
    cfg.model.update(latent_space="vae", vae_config=TINY_VAE, vae_random_init=True, patch_size=2)
    if reconstruction is not None:
        cfg.loss.reconstruction = reconstruction
    return cfg


def _one_step(cfg):
    """The stage's losses on its first batch, with the reconstruction and the pixels it used."""
    from accelerate import Accelerator

    from adatok_vlm.training.train_tokenizer import TokenizerStage

    torch.manual_seed(cfg.train.seed)
    stage = TokenizerStage(cfg, Accelerator(cpu=True))
    state = {"step": 1, "skipped_images": 0}
    batch = stage.prepare(next(iter(stage.batches())), state)
    return stage.step(batch, state), stage.out, batch[0]


def test_pixel_l2_is_the_default_l_recon_in_a_vae_latent_space(tmp_path):
    """Default ``loss.reconstruction pixel``: L_recon is 4 x the [0, 1] MSE of the decoded image (the L2 in
    [-1, 1]), not the latent MSE (logged as ``latent_loss``); ``latent`` keeps the latent MSE."""
    assert TokenizerTrainingConfig().loss.reconstruction == "pixel"
    losses_pixel, out, pixels = _one_step(_vae_config(tmp_path / "p"))
    expected = 4.0 * (out.reconstruction.float() - pixels.float()).pow(2).mean()
    assert float(losses_pixel["recon_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses_pixel["loss"]) == pytest.approx(float(expected), rel=1e-5)
    latent_mse = (out.latents.float() - out.target_latents.float()).pow(2).mean()
    assert float(losses_pixel["latent_loss"]) == pytest.approx(float(latent_mse), rel=1e-5)
    assert abs(float(losses_pixel["recon_loss"]) - float(latent_mse)) > 1e-3 * float(latent_mse)
    assert losses_pixel["loss"].requires_grad
    losses_latent, out, _ = _one_step(_vae_config(tmp_path / "l", "latent"))
    assert "latent_loss" not in losses_latent
    latent_mse = (out.latents.float() - out.target_latents.float()).pow(2).mean()
    assert float(losses_latent["recon_loss"]) == pytest.approx(float(latent_mse), rel=1e-5)


def test_pixel_and_latent_l_recon_are_one_run_in_the_pixel_space(tmp_path):
    """In the pixel latent space the latents are the image in [-1, 1]: both settings train bit for bit alike."""
    runs = {}
    for mode in ("pixel", "latent"):
        cfg = config(tmp_path / mode, max_steps=3, save_every=0)
        cfg.loss.reconstruction = mode
        train(cfg)
        runs[mode] = losses(tmp_path / mode)
    assert len(runs["pixel"]) == 3 and runs["pixel"] == runs["latent"]


def test_an_unknown_l_recon_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="loss.reconstruction.*'pixel', 'latent'.*'l1'"):
        fill_dataclass(TokenizerTrainingConfig, {"loss": {"reconstruction": "l1"}})


def test_a_model_flag_without_a_config_file_keeps_the_default_preset(tmp_path):
    """``--model.X`` merges into the trainer's default model section (it used to replace it, so
    ``--model.vae_path DIR`` dropped the preset); a config file's ``model:`` replaces the default whole."""
    from adatok_vlm.training.config import parse_config

    cfg, _ = parse_config(TokenizerTrainingConfig, ["--model.token_dim", "8"])
    assert cfg.model == {**TokenizerTrainingConfig().model, "token_dim": 8}
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n")
    cfg, _ = parse_config(TokenizerTrainingConfig, ["--config", str(path), "--model.token_dim", "8"])
    assert cfg.model == {"hidden_size": 64, "token_dim": 8}
