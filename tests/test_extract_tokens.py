"""Token cache: rows hold exactly each image's valid tokens, statistics and histograms match them, a
resumed extraction equals a straight one, and the length mode is checked against the tokenizer."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import tiny_model

from adatok_vlm.generator import LengthSampler
from adatok_vlm.training.batches import preload_images
from adatok_vlm.training.extract_tokens import TokenCache, main
from adatok_vlm.training.train_policy import main as train_policy
from adatok_vlm.training.data_setup import DataConfig, build_image_processor, load_split

NUM_CROPS = 40
DATA_FLAGS = ["--data.dataset", "natural_crops", "--data.num_crops", str(NUM_CROPS)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny AdaTok (m = 8) whose length policy had a few REINFORCE steps."""
    root = tmp_path_factory.mktemp("tokenizer")
    tiny_model(num_latent_tokens=8, seed=3).save_pretrained(root / "stage1")
    summary = train_policy(["--tokenizer", str(root / "stage1"), "--output_dir", str(root / "policy"),
                            "--max_steps", "3", "--train.batch_size", "8", "--train.num_threads", "1",
                            "--data.dataset", "natural_crops", "--data.num_crops", "32"])
    return summary["model_dir"]


def extract(tokenizer, out, *flags):
    return main(["--tokenizer", str(tokenizer), "--output_dir", str(out), *DATA_FLAGS,
                 "--extract.shard_size", "16", "--extract.batch_size", "8", "--extract.num_threads", "1", *flags])


def source_pixels(model):
    data = DataConfig(dataset="natural_crops", num_crops=NUM_CROPS)
    return preload_images(load_split(data, "train"), build_image_processor(model.config, data, train=False))


@pytest.mark.parametrize("num_tokens", ["auto", "search", "5"])
def test_rows_hold_exactly_the_encoded_tokens(tokenizer, tmp_path, num_tokens):
    import transformers

    summary = extract(tokenizer, tmp_path, "--num_tokens", num_tokens)
    assert summary["complete"] and summary["num_shards"] == 3
    assert not (tmp_path / "shards").exists(), "shards are removed once the dataset is assembled"
    model = transformers.AutoModel.from_pretrained(tokenizer).eval()
    images = source_pixels(model)
    x = images.pixels.float() / 255.0
    enc = model.encode(x, num_tokens=int(num_tokens) if num_tokens.isdigit() else num_tokens)

    ds = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert len(ds) == NUM_CROPS and ds.features["label"].names == json.loads(
        (tmp_path / "tokens.json").read_text())["class_names"]
    for i, row in enumerate(ds):
        length = int(enc.lengths[i])
        assert row["length"] == length and len(row["tokens"]) == length, i
        assert row["label"] == int(images.labels[i]) and row["index"] == i
        torch.testing.assert_close(torch.tensor(row["tokens"]), enc.tokens[i, :length], rtol=1e-5, atol=1e-6)
    assert set(ds["length"]) == ({5} if num_tokens == "5" else set(enc.lengths.tolist()))
    assert num_tokens != "auto" or len(set(ds["length"])) > 1, "the policy picks lengths per image"

    meta = json.loads((tmp_path / "tokens.json").read_text())
    valid = enc.tokens[enc.token_mask].double()                             # [sum L_i, D]
    torch.testing.assert_close(torch.tensor(meta["token_mean"], dtype=torch.float64), valid.mean(0))
    torch.testing.assert_close(torch.tensor(meta["token_std"], dtype=torch.float64), valid.std(0, unbiased=False))
    expected = LengthSampler.from_lengths(enc.lengths, images.labels, meta["num_classes"], 8).to_list()
    assert meta["length_histograms"] == expected
    assert meta["num_tokens"] == (5 if num_tokens == "5" else num_tokens)
    assert meta["tokenizer"] == str(Path(tokenizer).resolve()) and len(meta["tokenizer_fingerprint"]) == 16
    assert (meta["token_dim"], meta["max_tokens"], meta["num_items"]) == (model.config.token_dim, 8, NUM_CROPS)

    cache = TokenCache(tmp_path)                                            # the trainer's view of it
    assert len(cache) == NUM_CROPS
    item = cache[7]
    assert item["length"] == int(enc.lengths[7]) and item["label"] == int(images.labels[7])
    torch.testing.assert_close(item["tokens"], enc.tokens[7, : item["length"]], rtol=1e-5, atol=1e-6)


def test_a_resumed_extraction_equals_a_straight_one(tokenizer, tmp_path):
    straight = tmp_path / "straight"
    extract(tokenizer, straight)
    resumed = tmp_path / "resumed"
    first = extract(tokenizer, resumed, "--extract.max_shards", "2")          # "killed" after 2 of 3 shards
    assert not first["complete"] and first["encoded_shards"] == 2
    assert not (resumed / "tokens.json").exists() and len(list((resumed / "shards").glob("shard-*"))) == 2
    second = extract(tokenizer, resumed, "--extract.keep_shards", "true")
    assert second["complete"] and second["encoded_shards"] == 1, "finished shards are skipped"

    def load(path):
        ds = datasets.load_from_disk(str(path / "dataset"))
        return ds.to_dict(), json.loads((path / "tokens.json").read_text())

    assert load(straight) == load(resumed)

    # Losing the final dataset (a crash during assembly) re-assembles from the kept shards, encoding nothing.
    import shutil

    shutil.rmtree(resumed / "dataset")
    (resumed / "tokens.json").unlink()
    third = extract(tokenizer, resumed)
    assert third["complete"] and third["encoded_shards"] == 0
    assert load(straight) == load(resumed)
    assert extract(tokenizer, resumed)["encoded_shards"] == 0, "a finished cache is not redone"


def test_settings_are_checked(tokenizer, tmp_path):
    extract(tokenizer, tmp_path, "--extract.max_shards", "1")
    with pytest.raises(ValueError, match="other settings"):
        extract(tokenizer, tmp_path, "--num_tokens", "3")                    # unfinished shards of another mode
    assert extract(tokenizer, tmp_path, "--num_tokens", "3", "--extract.overwrite", "true")["complete"]
    with pytest.raises(ValueError, match="num_tokens must be 'auto', 'search' or an int in 1..8"):
        extract(tokenizer, tmp_path / "bad", "--num_tokens", "9")


def test_auto_needs_a_policy(tmp_path):
    tiny_model(num_latent_tokens=8).save_pretrained(tmp_path / "no_policy")
    with pytest.raises(ValueError, match="needs a tokenizer with a trained length policy"):
        extract(tmp_path / "no_policy", tmp_path / "out")
    assert extract(tmp_path / "no_policy", tmp_path / "fixed", "--num_tokens", "4")["complete"]


def test_extraction_uses_the_tokenizers_saved_processor_unless_told_otherwise(tokenizer, tmp_path):
    """Wide (48x32) images: the folder's saved processor centre-crops them (a natural-image model), the
    data section's default letter-boxes them. By default extraction follows the saved one; with
    ``--data.processor data`` the data section's."""
    import shutil

    import numpy as np
    import transformers
    from PIL import Image

    from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor

    folder = tmp_path / "natural_model"
    shutil.copytree(tokenizer, folder)
    natural = AdaTokImageProcessor(size=32, resize_mode="shortest_edge", crop="center", do_flip=False,
                                   resample="bicubic")
    natural.save_pretrained(folder)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(6):
        (images / "things").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(images / "things" / f"{i}.png")
    model = transformers.AutoModel.from_pretrained(folder).eval()
    raw = load_split(DataConfig(dataset=str(images)), "train")

    def tokens_through(processor):   # a set this small is preloaded (as uint8) by the extraction too
        x = preload_images(raw, processor, cache=False).pixels.float() / 255.0
        return model.encode(x, num_tokens=4).tokens[:, :4]

    def extracted(out, *flags):
        main(["--tokenizer", str(folder), "--output_dir", str(out), "--data.dataset", str(images),
              "--num_tokens", "4", "--extract.batch_size", "4", "--extract.num_threads", "1", *flags])
        ds = datasets.load_from_disk(str(out / "dataset"))
        return torch.stack([torch.tensor(ds[i]["tokens"]) for i in range(len(ds))])

    cropped, boxed = tokens_through(natural), tokens_through(build_image_processor(model.config, DataConfig(), False))
    assert not torch.allclose(cropped, boxed, atol=1e-3), "the two geometries must differ for this test to mean anything"
    torch.testing.assert_close(extracted(tmp_path / "default"), cropped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extracted(tmp_path / "data", "--data.processor", "data"), boxed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="data.processor must be one of"):
        extracted(tmp_path / "bad", "--data.processor", "mine")
