"""Linear probing (paper Appendix B.5): pooling, the probe on synthetic tokens, and real tokens of a
briefly trained tokenizer on Fashion-MNIST."""

from pathlib import Path

import pytest
import torch

from adatok_vlm.training.linear_probe import ProbeConfig, linear_probe, pool_tokens, probe_accuracy, train_probe


def test_mean_pooling_averages_only_the_valid_prefix():
    tokens = torch.randn(3, 5, 4)
    lengths = torch.tensor([1, 3, 5])
    pooled = pool_tokens(tokens, lengths, "mean")
    for i, length in enumerate(lengths.tolist()):
        assert torch.allclose(pooled[i], tokens[i, :length].mean(0), atol=1e-6)
    assert torch.allclose(pool_tokens(tokens, 2, "mean"), tokens[:, :2].mean(1), atol=1e-6)


def test_flatten_pooling_zeroes_the_tail_in_one_fixed_space():
    tokens = torch.randn(2, 4, 3)
    flat = pool_tokens(tokens, torch.tensor([2, 4]), "flatten")
    assert flat.shape == (2, 12)
    assert torch.equal(flat[0, :6], tokens[0, :2].flatten()) and bool((flat[0, 6:] == 0).all())
    assert torch.equal(flat[1], tokens[1].flatten())


def test_pooling_refuses_bad_arguments():
    tokens = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="pooling"):
        pool_tokens(tokens, 2, "max")
    with pytest.raises(ValueError, match="1..4"):
        pool_tokens(tokens, 5, "mean")
    with pytest.raises(ValueError, match="ProbeConfig.pooling"):
        ProbeConfig(pooling="cls")


def _synthetic(n: int, informative_position: int, seed: int):
    """Tokens [n, 6, 4] whose class (of 4) is written only in token ``informative_position``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    tokens = 0.3 * torch.randn(n, 6, 4, generator=g)
    tokens[torch.arange(n), informative_position, labels] += 3.0
    return tokens, labels


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_probe_reads_what_the_tokens_carry(optimizer):
    train_tokens, train_labels = _synthetic(300, 0, seed=0)
    test_tokens, test_labels = _synthetic(200, 0, seed=1)
    config = ProbeConfig(pooling="flatten", optimizer=optimizer, steps=100 if optimizer == "lbfgs" else 60)
    probe = train_probe(train_tokens, train_labels, 4, config)
    assert probe_accuracy(probe, test_tokens, test_labels, 6, "flatten") > 0.97

    # Class only in the last token: invisible to a 1-token probe, plain to a 6-token one.
    train_tokens, train_labels = _synthetic(300, 5, seed=2)
    test_tokens, test_labels = _synthetic(200, 5, seed=3)
    short = train_probe(train_tokens, train_labels, 4, ProbeConfig(pooling="mean"), length=1)
    full = train_probe(train_tokens, train_labels, 4, ProbeConfig(pooling="mean"), length=6)
    assert probe_accuracy(short, test_tokens, test_labels, 1, "mean") < 0.45
    assert probe_accuracy(full, test_tokens, test_labels, 6, "mean") > 0.9


def test_tail_drop_makes_one_probe_work_at_every_length():
    train_tokens, train_labels = _synthetic(300, 0, seed=4)
    test_tokens, test_labels = _synthetic(200, 0, seed=5)
    for optimizer in ("lbfgs", "adam"):
        config = ProbeConfig(pooling="mean", tail_drop=True, optimizer=optimizer, steps=60)
        probe = train_probe(train_tokens, train_labels, 4, config)
        for length in (1, 3, 6):
            assert probe_accuracy(probe, test_tokens, test_labels, length, "mean") > 0.9, (optimizer, length)


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def fmnist_tokenizer(tmp_path_factory):
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file() or not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from adatok_vlm.training.config import fill_dataclass
    from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig, train

    out = tmp_path_factory.mktemp("fmnist_tokenizer")
    cfg = fill_dataclass(TokenizerTrainingConfig, {
        "model": {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
                  "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                  "num_latent_tokens": 8},
        "data": {"dataset": "fashion_mnist", "limit": 512, "preload": True, "resize_mode": "pad"},
        "train": {"output_dir": str(out), "max_steps": 300, "batch_size": 32, "lr": 2e-3, "warmup_steps": 10,
                  "log_every": 100, "sample_every": 0, "save_every": 0, "num_threads": 1, "seed": 0},
    })
    return train(cfg)["model_dir"]


def test_linear_probe_on_fashion_mnist_tokens_is_well_above_chance(fmnist_tokenizer):
    import transformers

    from adatok_vlm.training.batches import preload_images
    from adatok_vlm.training.data import load_image_dataset

    model = transformers.AutoModel.from_pretrained(fmnist_tokenizer).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(fmnist_tokenizer)
    train_set = preload_images(load_image_dataset("fashion_mnist", "train", limit=512), processor, cache=False)
    test_set = preload_images(load_image_dataset("fashion_mnist", "test", limit=500), processor, cache=False)
    args = (model, train_set.pixels, train_set.labels, test_set.pixels, test_set.labels)

    flat = linear_probe(*args, config=ProbeConfig(pooling="flatten"), progress=False)
    assert flat["chance"] == pytest.approx(0.1) and flat["num_classes"] == 10
    assert sorted(int(k) for k in flat["per_length"]) == [1, 2, 4, 8]
    assert flat["per_length"]["8"] >= 0.40, flat["per_length"]
    assert flat["per_length"]["8"] > flat["per_length"]["1"], flat["per_length"]   # later tokens add information

    mean = linear_probe(*args, lengths=[8], config=ProbeConfig(pooling="mean"), progress=False)
    assert mean["per_length"]["8"] >= 0.25, mean

    dropped = linear_probe(*args, lengths=[1, 8], config=ProbeConfig(pooling="flatten", tail_drop=True),
                           progress=False)
    assert dropped["per_length"]["8"] >= 0.30 and dropped["per_length"]["1"] >= 0.20, dropped["per_length"]


def test_linear_probe_refuses_unlabelled_images():
    from adatok_vlm import AdaTokConfig, AdaTokModel

    model = AdaTokModel(AdaTokConfig.from_preset("adatok-tiny", hidden_size=32, num_encoder_layers=1,
                                                 num_decoder_layers=1, num_attention_heads=2, decoder_hidden_size=32,
                                                 decoder_num_attention_heads=2, num_latent_tokens=4)).eval()
    pixels = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(model, pixels, torch.full((4,), -1), pixels, torch.zeros(4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="1..4"):
        linear_probe(model, pixels, torch.zeros(4, dtype=torch.long), pixels, torch.zeros(4, dtype=torch.long),
                     lengths=[8], progress=False)


def test_evaluate_cli_linear_probe_writes_table_json_and_plot(tmp_path):
    """`adatok evaluate --linear_probe` on labelled data: accuracies per length in every output."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    import json

    from adatok_vlm.cli import main
    from conftest import tiny_model

    model_dir = tmp_path / "adatok"
    tiny_model(num_latent_tokens=8, image_size=32).save_pretrained(model_dir)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_dir), "--data", "fashion_mnist", "--limit", "40", "--lengths", "1,8",
                 "--metrics", "rmse", "--out", str(out), "--device", "cpu", "--no_progress", "--linear_probe",
                 "--probe_train_limit", "60", "--probe_lengths", "1,8"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    probe = report["linear_probe"]
    assert set(probe["per_length"]) == {"1", "8"} and probe["num_train"] == 60 and probe["num_test"] == 40
    assert all(0.0 <= v <= 1.0 for v in probe["per_length"].values())
    assert "linear_probe_vs_tokens.png" in report["files"] and (out / "linear_probe_vs_tokens.png").stat().st_size > 0
    assert "Linear probe" in (out / "metrics.md").read_text()


def test_evaluate_cli_linear_probe_refuses_unlabelled_data(tmp_path, monkeypatch):
    from adatok_vlm.training import evaluate
    from conftest import tiny_model

    model_dir = tmp_path / "adatok"
    tiny_model(num_latent_tokens=8).save_pretrained(model_dir)
    unlabelled = (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.full((4,), -1))
    monkeypatch.setattr(evaluate, "load_pixels", lambda *a, **k: unlabelled)
    with pytest.raises(ValueError, match="labelled"):
        evaluate.main(["--model", str(model_dir), "--data", "natural_crops", "--limit", "4", "--lengths", "8",
                       "--metrics", "rmse", "--out", str(tmp_path / "o"), "--device", "cpu", "--no_progress",
                       "--linear_probe"])
