"""The paper-scale recipes in configs/ parse, build their models and train one step on CPU.

Each ``*-imagenet.yaml`` config holds one stage of the paper's recipe (stage 1, stage 2, the DiT, a VLM with a
real LM read from a local folder). Here each runs through its trainer's public ``main`` on a tiny
ImageNet-layout folder written by the test (``train/<wnid>/*.JPEG``, a flat ``val/`` with a ``filename label``
file), overridden on the command line only where the paper's size cannot run on a CPU: a few images at 32x32,
a narrow and shallow transformer, one step of batch 2. What makes each config what it is stays: the VA-VAE
f16d32 architecture (random weights, ``model.vae_random_init``), LPIPS and the GAN on, EMA, the natural-image
transforms, the reward table on a coarse length grid, the DiT's recipe (at a small width and depth), a
local LM folder.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adatok_vlm import AdaTokModel
from adatok_vlm.tokenizer.configuration_adatok import VAE_ARCHITECTURES
from adatok_vlm.training import extract_tokens, train_dit, train_policy, train_tokenizer, train_vlm
from adatok_vlm.training.config import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER = CONFIGS / "tokenizer" / "adatok-s-imagenet.yaml"
POLICY = CONFIGS / "policy" / "adatok-s-imagenet.yaml"
DIT = CONFIGS / "dit" / "adatok-s-imagenet.yaml"
VLM = CONFIGS / "vlm" / "smollm2-imagenet.yaml"
WNIDS = ["n01440764", "n01443537"]
PER_CLASS = 4
M = 8   # num_latent_tokens of the reduced tokenizer

# The CPU-sized model: adatok-s's structure (VA-VAE latent space, patch 1) at a small width and depth and 32x32.
SMALL_TOKENIZER = ["--model.image_size", "32", "--model.vae_random_init", "true",
                   "--model.hidden_size", "32", "--model.decoder_hidden_size", "32",
                   "--model.num_attention_heads", "2", "--model.decoder_num_attention_heads", "2",
                   "--model.num_encoder_layers", "1", "--model.num_decoder_layers", "1",
                   "--model.num_latent_tokens", str(M), "--model.token_dim", "8", "--model.policy_hidden_size", "16"]
ONE_STEP = ["--max_steps", "1", "--train.batch_size", "2", "--train.num_threads", "1", "--train.log_every", "1",
            "--train.save_every", "0"]


def write_imagenet(root: Path) -> Path:
    """``root/train/<wnid>/*.JPEG`` (PER_CLASS random photos of two classes) and a flat ``root/val/`` labelled by
    ``root/val/val.txt`` (``filename wnid`` lines): the layout of an ImageNet release."""
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    (root / "val").mkdir()
    lines = []
    for i in range(4):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / "val" / name)
        lines.append(f"{name} {WNIDS[i % 2]}")
    (root / "val" / "val.txt").write_text("\n".join(lines) + "\n")
    return root


def step_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def stage1(imagenet, tmp_path_factory, adatok_cache):
    """One stage-1 step of the tokenizer config on the tiny ImageNet folder; returns its output folder."""
    out = tmp_path_factory.mktemp("stage1")
    train_tokenizer.main(["--config", str(TOKENIZER), "--data.dataset", str(imagenet), "--data.limit", "4",
                          "--data.num_workers", "0", *SMALL_TOKENIZER, *ONE_STEP, "--output_dir", str(out),
                          "--loss.gan_start_step", "0", "--train.warmup_steps", "0", "--train.sample_every", "0"])
    return out


@pytest.fixture(scope="module")
def stage2(stage1, imagenet, tmp_path_factory):
    """One stage-2 step of the policy config (reward table on the coarse grid) on the stage-1 model."""
    out = tmp_path_factory.mktemp("stage2")
    summary = train_policy.main(["--config", str(POLICY), "--tokenizer", str(stage1 / "model"),
                                 "--data.dataset", str(imagenet), "--data.num_workers", "0",
                                 "--model.policy_min_tokens", "2", "--model.policy_max_tokens", str(M),
                                 "--model.policy_step", "2", "--train.table_size", "4", "--train.val_size", "2",
                                 *ONE_STEP, "--output_dir", str(out), "--train.warmup_steps", "0"])
    return out, summary


@pytest.fixture(scope="module")
def tokens(stage2, imagenet, tmp_path_factory):
    """The extract_tokens cache of the stage-2 model over the tiny training split (policy lengths)."""
    out = tmp_path_factory.mktemp("tokens")
    extract_tokens.main(["--tokenizer", str(stage2[0] / "model"), "--output_dir", str(out),
                         "--data.dataset", str(imagenet), "--data.transforms", "natural", "--extract.num_threads", "1"])
    return out


@pytest.fixture(scope="module")
def local_lm(tmp_path_factory) -> Path:
    """A tiny random Llama and its character tokenizer saved as a local Hugging Face folder (what ``lm.path``
    reads for SmolLM2): the config's real-LM path, at a CPU size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lm")
    tok = train_vlm.char_tokenizer()
    fields = dict(train_vlm.LM_PRESETS["tiny-llama"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ============================================================================================
# the configs as written
# ============================================================================================
GPUS = 8   # the paper's "8 Nvidia H800 GPUs": every config's batch_size is per GPU


@pytest.mark.parametrize("path, cls", [(TOKENIZER, train_tokenizer.TokenizerTrainingConfig),
                                       (POLICY, train_policy.PolicyTrainingConfig),
                                       (DIT, train_dit.DiTTrainingConfig),
                                       (VLM, train_vlm.VLMTrainingConfig)], ids=["tokenizer", "policy", "dit", "vlm"])
def test_each_paper_config_parses_with_its_trainer_at_global_batch_256(path, cls):
    config, _ = parse_config(cls, ["--config", str(path)])
    assert config.train.batch_size * config.train.grad_accum * GPUS == 256   # paper: "batch size of all stages"
    assert config.train.weight_decay == 4e-5 or cls is train_dit.DiTTrainingConfig   # DiT: none (DiT's recipe)
    text = path.read_text()
    assert "GPU count" in text and "linear" in text, f"{path.name} does not say how to scale batch and lr"


def test_tokenizer_config_holds_the_stage1_recipe():
    config, _ = parse_config(train_tokenizer.TokenizerTrainingConfig, ["--config", str(TOKENIZER)])
    model = train_tokenizer.build_model_config(config.model)
    assert model.latent_space == "vae" and model.num_latent_tokens == 256 and model.image_size == 256
    assert model.vae_config["block_out_channels"] == VAE_ARCHITECTURES["va-vae-f16d32"]["block_out_channels"]
    assert model.latent_channels == 32 and model.latent_downsample == 16
    assert config.train.max_steps == 500_000 and config.train.warmup_steps > 0 and config.train.ema_decay > 0
    loss = config.loss
    assert loss.perceptual_weight > 0 and loss.gan_weight > 0 and 0 < loss.gan_start_step < config.train.max_steps
    assert config.data.transforms == "natural" and config.data.eval_split == "val" and config.data.preload is None


def test_tokenizer_config_without_vae_weights_is_an_error_naming_vae_path():
    """``vae_path: null`` in the file is a placeholder the user must fill: the model refuses to encode."""
    config, _ = parse_config(train_tokenizer.TokenizerTrainingConfig,
                             ["--config", str(TOKENIZER), *[a for a in SMALL_TOKENIZER if a not in
                                                           ("--model.vae_random_init", "true")]])
    model = AdaTokModel(train_tokenizer.build_model_config(config.model))
    with pytest.raises(FileNotFoundError, match="vae_path"):
        model.encode(torch.rand(1, 3, 32, 32), num_tokens=4)


def test_policy_config_states_the_decode_count_of_its_reward_table():
    """The table's size is table_size + val_size images x the grid's lengths; the file states that count."""
    from adatok_vlm.tokenizer.policy import length_grid

    config, _ = parse_config(train_policy.PolicyTrainingConfig, ["--config", str(POLICY)])
    tc, mc = config.train, config.model
    assert tc.reward_table and tc.max_steps == 20_000 and tc.table_size < 1_281_167
    grid = length_grid(mc["policy_min_tokens"], mc["policy_max_tokens"], mc["policy_step"])
    assert int(grid[-1]) == 256 and len(grid) < 256
    decodes = (tc.table_size + tc.val_size) * len(grid)
    assert f"{decodes:,}" in POLICY.read_text(), f"the file should state the {decodes:,} decodes its table costs"
    assert set(mc) <= set(train_policy.POLICY_FIELDS)


def test_dit_config_trains_200_epochs_of_imagenet_at_its_batch():
    config, _ = parse_config(train_dit.DiTTrainingConfig, ["--config", str(DIT)])
    global_batch = config.train.batch_size * config.train.grad_accum * GPUS
    assert config.train.max_steps == -(-1_281_167 * 200 // global_batch)
    assert config.model["preset"] == "dit-xl"


# ============================================================================================
# one step of each at a reduced size
# ============================================================================================
def test_tokenizer_config_runs_one_step_with_lpips_gan_and_ema_in_the_va_vae_space(stage1):
    (row,) = step_rows(stage1)
    assert row["step"] == 1 and np.isfinite(row["loss"])
    assert row["perceptual"] > 0 and row["gan_weight"] == pytest.approx(0.1) and row["d_loss"] > 0
    step = stage1 / "checkpoints" / "step-00000001"
    ema = load_file(str(step / "ema.safetensors"))
    assert int(ema["num_updates"]) == 1   # EMA on (ema_decay 0.999) and updated by the step
    assert any(k.startswith("shadow.encoder.") for k in ema) and any(k.startswith("shadow.decoder.") for k in ema)
    assert (step / "discriminator.safetensors").is_file()
    exported = json.loads((stage1 / "model" / "config.json").read_text())
    assert exported["latent_space"] == "vae" and exported["vae_config"]["latent_channels"] == 32
    assert exported["vae_config"]["block_out_channels"] == VAE_ARCHITECTURES["va-vae-f16d32"]["block_out_channels"]
    processor = json.loads((stage1 / "model" / "preprocessor_config.json").read_text())
    assert processor["resize_mode"] == "shortest_edge" and processor["crop"] == "center"


def test_policy_config_runs_one_step_on_a_reward_table_over_a_coarse_grid(stage2):
    out, summary = stage2
    (row,) = step_rows(out)
    assert np.isfinite(row["loss"]) and row["step"] == 1
    table = load_file(str(out / "reward_table" / "train.safetensors"))
    assert tuple(table["rl"].shape) == (4, 4)              # table_size 4 x grid [2, 4, 6, 8]
    assert tuple(load_file(str(out / "reward_table" / "val.safetensors"))["rl"].shape) == (2, 4)
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["policy_enabled"] and exported["policy_step"] == 2 and exported["reward_kind"] == "structured"


def test_dit_config_runs_one_step_on_the_token_cache(tokens, tmp_path):
    out = tmp_path / "dit"
    train_dit.main(["--config", str(DIT), "--data.tokens", str(tokens), "--model.hidden_size", "64",
                    "--model.depth", "2", "--model.num_heads", "4", *ONE_STEP, "--output_dir", str(out)])
    (row,) = step_rows(out)
    assert np.isfinite(row["loss"])
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["num_classes"] == len(WNIDS) and exported["class_dropout_prob"] == 0.1
    assert (out / "checkpoints" / "step-00000001" / "ema.safetensors").is_file()


def test_vlm_config_runs_one_step_with_an_lm_from_a_local_folder(tokens, stage2, local_lm, tmp_path):
    out = tmp_path / "vlm"
    train_vlm.main(["--config", str(VLM), "--lm.path", str(local_lm), "--tokenizer", str(stage2[0] / "model"),
                    "--data.tokens", str(tokens), *ONE_STEP, "--output_dir", str(out)])
    (row,) = step_rows(out)
    assert np.isfinite(row["loss"])


def test_the_configs_eval_split_of_the_imagenet_folder_is_labelled(imagenet):
    """The tiny folder the runs read is the layout the configs name: ``data.eval_split val``, flat, labelled."""
    from adatok_vlm.training.data import load_image_dataset

    config, _ = parse_config(train_tokenizer.TokenizerTrainingConfig, ["--config", str(TOKENIZER)])
    val = load_image_dataset(str(imagenet), split=config.data.eval_split)
    names = val.features["label"].names
    assert names == WNIDS and [names[y] for y in val["label"]] == [WNIDS[i % 2] for i in range(4)]
