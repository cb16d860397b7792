"""Stage 2 end to end on a briefly trained tiny tokenizer: the policy trains, saves inside the
AdaTok checkpoint, reloads with AutoModel, and every length mode answers."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from adatok_vlm.training.config import fill_dataclass, parse_config
from adatok_vlm.training.train_policy import PolicyTrainingConfig, main
from adatok_vlm.training.train_policy import train as train_policy
from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig
from adatok_vlm.training.train_tokenizer import train as train_tokenizer

DATA = {"dataset": "natural_crops", "num_crops": 256, "preload": True}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = fill_dataclass(TokenizerTrainingConfig, {
        "model": {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
                  "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                  "num_latent_tokens": 8},
        "data": DATA,
        "train": {"output_dir": str(out), "max_steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3,
                  "log_every": 10, "sample_every": 0, "save_every": 0, "num_threads": 2},
    })
    return train_tokenizer(cfg)["model_dir"]


def test_stage2_trains_saves_and_reloads_the_policy(stage1, tmp_path):
    summary = main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "12",
                    "--train.batch_size", "16", "--train.log_every", "1", "--train.save_every", "6",
                    "--data.dataset", "natural_crops", "--data.num_crops", "256",
                    "--model.policy_min_tokens", "2", "--model.reward_kind", "structured"])
    assert summary["steps"] == 12
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    for key in ("reward", "entropy", "log_prob", "length_mean", "entropy_weight", "curve_loss"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[0]["entropy_weight"] > rows[-1]["entropy_weight"], "the entropy bonus decays"
    for name in ("policy_entropy.png", "policy_log_prob.png"):
        assert (tmp_path / name).is_file()
    model = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()
    assert model.has_policy and model.config.policy_min_tokens == 2 and model.config.reward_kind == "structured"
    images = torch.rand(5, 3, 32, 32)
    auto = model.encode(images, num_tokens="auto")
    assert auto.lengths.min() >= 2 and auto.lengths.max() <= 8
    for mode in ("search", "oracle", {"max_mse": 0.05}, {"mean_budget": 4}):
        enc = model.encode(images, num_tokens=mode)
        assert enc.lengths.shape == (5,) and enc.lengths.min() >= 2, mode
    budget = model.encode(images, num_tokens={"mean_budget": 4}).lengths.float().mean()
    assert budget <= 4.0


def test_stage2_resume_continues_the_step_count(stage1, tmp_path):
    base = {"tokenizer": stage1, "data": DATA,
            "train": {"output_dir": str(tmp_path), "batch_size": 8, "save_every": 3, "num_threads": 2,
                      "lr_schedule": "constant", "warmup_steps": 0, "seed": 1}}
    train_policy(fill_dataclass(PolicyTrainingConfig, {**base, "train": {**base["train"], "max_steps": 3}}))
    summary = train_policy(fill_dataclass(PolicyTrainingConfig,
                                          {**base, "train": {**base["train"], "max_steps": 6, "resume": "auto"}}))
    assert summary["steps"] == 6
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]


def test_auto_makes_no_decoder_call(stage1, tmp_path, monkeypatch):
    summary = main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "2",
                    "--data.dataset", "natural_crops", "--data.num_crops", "64", "--train.batch_size", "8"])
    model = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(model.decoder, "forward", forbidden)
    enc = model.encode(torch.rand(3, 3, 32, 32), num_tokens="auto")
    assert enc.lengths.shape == (3,)


def test_reward_table_mode_trains_scores_held_out_and_reuses_its_table(stage1, tmp_path):
    """``train.reward_table``: rl measured once at every length (equal to a direct decode), the exact
    expected-reward objective, held-out scores beside Table 2's baselines, and the table reused on resume."""
    from adatok_vlm.training.reward_table import RewardTable

    args = ["--tokenizer", stage1, "--output_dir", str(tmp_path), "--train.batch_size", "16",
            "--train.log_every", "2", "--train.save_every", "0", "--data.dataset", "natural_crops",
            "--data.num_crops", "256", "--model.reward_kind", "structured", "--model.policy_dropout", "0.1",
            "--train.reward_table", "true", "--train.table_size", "40", "--train.val_size", "24",
            "--train.objective", "expected", "--train.lr_schedule", "constant", "--train.ce_warm_steps", "2"]
    first = main(args + ["--max_steps", "6"])
    assert first["reward_table_s"] > 0
    files = sorted(p.name for p in (tmp_path / "reward_table").iterdir())
    assert files == ["train.safetensors", "val.safetensors"]
    model = transformers.AutoModel.from_pretrained(first["model_dir"]).eval()
    assert model.config.policy_dropout == 0.1
    margin = model.config.quality_margin          # calibrated on the 24 held-out images
    assert margin != 0.0
    images = torch.rand(6, 3, 32, 32)
    calibrated = model.encode(images, num_tokens={"max_mse": 0.02}).lengths
    model.config.quality_margin = 0.0
    raw = model.encode(images, num_tokens={"max_mse": 0.02}).lengths
    assert bool(((calibrated >= raw) if margin > 0 else (calibrated <= raw)).all())
    model.config.quality_margin = margin
    grid = model.length_grid
    table = RewardTable.load(tmp_path / "reward_table" / "train.safetensors", _meta(tmp_path / "reward_table"))
    assert table.rl.shape == (40, grid.numel()) and table.features.shape == (40, 2 * model.config.hidden_size)
    # rows 0 and 1 of the table are the images ``table.rows[:2]`` of the training data (a seeded draw over
    # the whole split, not its first images): decode them directly at a few lengths
    from adatok_vlm.training.data_setup import build_train_data
    from adatok_vlm.training.train_policy import table_rows

    cfg, _ = parse_config(PolicyTrainingConfig, args)
    data, _ = build_train_data(cfg, model.config)
    assert table.rows.tolist() == table_rows(len(data), 40, 24, cfg.train.seed)[0]
    x = data.batch(table.rows[:2].tolist())["pixel_values"]
    with torch.no_grad():
        tokens, hidden, _, _ = model.forward_encoder(x)
        assert torch.allclose(model.policy_features(hidden), table.features[:2], atol=1e-5)
        for k in (0, grid.numel() - 1):
            L = int(grid[k])
            recon = model.decode(tokens[:, :L], torch.full((2,), L))
            assert torch.allclose((recon - x).pow(2).flatten(1).mean(1), table.rl[:2, k], rtol=1e-4, atol=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    held_out = [r for r in rows if "val_reward" in r]
    assert held_out and all(r["val_oracle_reward"] >= r["val_reward"] - 1e-6 for r in held_out)
    assert all(r["val_oracle_reward"] >= r["val_best_fixed_reward"] - 1e-6 for r in held_out)
    assert (tmp_path / "policy_val_reward.png").is_file()
    resumed = main(args + ["--max_steps", "8", "--resume", "auto"])
    assert resumed["steps"] == 8 and resumed["reward_table_s"] == 0.0   # read back, not measured again


def _meta(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "train.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["meta"])


@pytest.mark.parametrize("flags", [["--train.objective", "expected"], ["--train.val_size", "8"],
                                   ["--train.ce_warm_steps", "2"]])
def test_table_only_options_need_a_table(stage1, tmp_path, flags):
    with pytest.raises(ValueError, match="reward_table"):
        main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "1", "--data.dataset",
              "natural_crops", "--data.num_crops", "32", *flags])


@pytest.mark.parametrize("objective", ["reinforce", "expected"])
def test_table_objectives_learn_a_per_image_length(objective):
    """Two kinds of image: one is best at 2 tokens, the other at 7. Either objective must learn to
    tell them apart from the features alone (a policy that cannot would pick one length for both)."""
    from adatok_vlm.tokenizer.policy import TokenLengthPolicy, length_grid
    from adatok_vlm.training.reward_table import table_policy_loss

    torch.manual_seed(0)
    grid = length_grid(1, 8)
    policy = TokenLengthPolicy(6, grid, hidden_dim=32, num_layers=1)
    kind = torch.randint(0, 2, (256,))
    features = torch.randn(256, 6) * 0.1 + torch.nn.functional.one_hot(kind, 6).float() * 2
    best = torch.where(kind == 0, 2, 7)
    rewards = 1.0 - 0.3 * (grid[None, :] - best[:, None]).abs().float()   # [256, 8], peaked at `best`
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for step in range(300):
        idx = torch.randint(0, 256, (64,))
        loss, logs, drawn = table_policy_loss(policy, features[idx], rewards[idx], objective, 0.1, "baseline",
                                              0.01 * (1 - step / 300))
        opt.zero_grad()
        loss.backward()
        opt.step()
    chosen = policy.mode(features)
    assert (chosen == best).float().mean() > 0.95, chosen.tolist()[:16]
    assert set(drawn) >= {"lengths", "reward", "baseline", "log_prob", "entropy"}


def test_table_policy_loss_reads_eq8_s_baseline_per_image_or_per_batch():
    """Eq. 8's baseline on a reward table: ``reading="image"`` (the default) measures R at each image's own
    rounded E_pi[L]; ``batch_length`` at the batch's mean length (one column for all); ``batch_reward``
    pools the per-image baselines over the batch. The draws do not depend on the reading."""
    from adatok_vlm.tokenizer.policy import TokenLengthPolicy, length_grid
    from adatok_vlm.training.reward_table import table_policy_loss

    torch.manual_seed(0)
    policy = TokenLengthPolicy(5, length_grid(1, 8), hidden_dim=16, num_layers=1)
    torch.nn.init.normal_(policy.mlp.out.weight, std=0.5)   # a non-uniform policy: E_pi[L] differs per row
    features, rewards = torch.randn(32, 5), torch.rand(32, 8)
    drawn = {}
    for reading in ("image", "batch_length", "batch_reward"):
        torch.manual_seed(1)
        _, _, drawn[reading] = table_policy_loss(policy, features, rewards, "reinforce", 0.1, "relative", 0.01,
                                                 reading)
    d0 = drawn["image"]
    expected = policy.distribution(features).probs.detach() @ policy.grid.float()
    torch.testing.assert_close(d0["mean_lengths"], expected.round().clamp(1, 8).long())
    rows = torch.arange(32)
    torch.testing.assert_close(d0["baseline"], rewards[rows, d0["mean_lengths"] - 1])
    assert len(set(d0["mean_lengths"].tolist())) > 1, "the test needs per-image means that differ"
    batch = drawn["batch_length"]
    torch.testing.assert_close(batch["lengths"], d0["lengths"])           # same draws
    assert len(set(batch["mean_lengths"].tolist())) == 1                # one L_mean for the batch
    column = int(batch["mean_lengths"][0]) - 1
    torch.testing.assert_close(batch["baseline"], rewards[:, column])
    torch.testing.assert_close(drawn["batch_reward"]["baseline"], d0["baseline"].mean().expand(32))


def test_ce_warm_start_is_the_cross_entropy_to_the_reward_softmax():
    """``ce_tau``: the loss is ``-sum softmax(R / tau) log pi`` (not the reward objective), its minimum is at
    ``pi = softmax(R / tau)``, and the trainer allows it only with a reward table and a positive tau."""
    from adatok_vlm.tokenizer.policy import TokenLengthPolicy, length_grid
    from adatok_vlm.training.reward_table import table_policy_loss

    torch.manual_seed(0)
    policy = TokenLengthPolicy(5, length_grid(1, 8), hidden_dim=16, num_layers=1)
    torch.nn.init.normal_(policy.mlp.out.weight, std=0.5)
    features, rewards = torch.randn(16, 5), torch.rand(16, 8)
    loss, logs, _ = table_policy_loss(policy, features, rewards, "expected", 0.1, "baseline", 0.05, ce_tau=0.1)
    log_pi = torch.log_softmax(policy(features).float(), 1)
    target = torch.softmax(rewards / 0.1, 1)
    torch.testing.assert_close(loss, -(target * log_pi).sum(1).mean())
    assert logs["entropy_weight"] == 0.0
    reward_loss, _, _ = table_policy_loss(policy, features, rewards, "expected", 0.1, "baseline", 0.05)
    assert not torch.allclose(loss, reward_loss)
    with pytest.raises(ValueError, match="ce_warm_steps .* needs"):
        fill_dataclass(PolicyTrainingConfig, {"train": {"ce_warm_steps": 10}})
    with pytest.raises(ValueError, match="ce_tau"):
        fill_dataclass(PolicyTrainingConfig, {"train": {"ce_warm_steps": 10, "ce_tau": 0.0, "reward_table": True}})


def test_baseline_reading_is_validated():
    with pytest.raises(ValueError, match="baseline_reading"):
        fill_dataclass(PolicyTrainingConfig, {"train": {"baseline_reading": "global"}})


@pytest.mark.parametrize("table", [False, True])
def test_a_policy_reading_image_statistics_trains_online_and_from_a_table_and_reloads(stage1, tmp_path, table):
    """``model.policy_image_statistics``: the policy's input grows by the 9 detail statistics of the pixels the
    encoder read, in the online step, in the reward table and in ``encode("auto")``; asking for its features
    without the pixels names what is missing."""
    from adatok_vlm.tokenizer.policy import IMAGE_STATISTICS

    args = ["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "4", "--train.batch_size", "8",
            "--train.log_every", "1", "--train.save_every", "0", "--data.dataset", "natural_crops",
            "--data.num_crops", "256", "--model.policy_image_statistics", "true"]
    if table:
        args += ["--train.reward_table", "true", "--train.table_size", "24", "--train.val_size", "16"]
    model = transformers.AutoModel.from_pretrained(main(args)["model_dir"]).eval()
    assert model.config.policy_image_statistics is True
    assert model.policy.mlp.in_dim == 2 * model.config.hidden_size + len(IMAGE_STATISTICS)
    images = torch.rand(3, 3, 32, 32)
    assert model.encode(images, num_tokens="auto").lengths.shape == (3,)
    _, hidden, _, _ = model.forward_encoder(images)
    with pytest.raises(ValueError, match="pass pixel_values"):
        model.policy_features(hidden)


def test_a_policy_reading_the_bottleneck_tokens_trains_from_a_table_and_reloads(stage1, tmp_path):
    """``model.policy_token_features``: the policy's input grows by the m bottleneck tokens, flattened in prefix
    order; they are exactly the tokens ``forward_encoder`` gives the decoder (one encoder pass), so the table's
    features, the online step's and ``encode("auto")``'s agree, and the model reloads with that input width."""
    summary = main(["--tokenizer", stage1, "--output_dir", str(tmp_path), "--max_steps", "4", "--train.batch_size",
                    "8", "--train.log_every", "1", "--train.save_every", "0", "--data.dataset", "natural_crops",
                    "--data.num_crops", "256", "--model.policy_token_features", "true", "--train.reward_table",
                    "true", "--train.table_size", "24", "--train.val_size", "16"])
    model = transformers.AutoModel.from_pretrained(summary["model_dir"]).eval()
    c = model.config
    assert c.policy_token_features is True and c.policy_image_statistics is False
    width = c.num_latent_tokens * c.token_dim
    assert model.policy.mlp.in_dim == 2 * c.hidden_size + width == model.quality_head.mlp.in_dim
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        tokens, hidden, _, _ = model.forward_encoder(images)
        features = model.policy_features(hidden)
    assert features.shape == (3, 2 * c.hidden_size + width)
    torch.testing.assert_close(features[:, -width:], tokens.flatten(1))
    # the tokens carry what the means do not: two images' features differ in that tail
    assert not torch.allclose(features[0, -width:], features[1, -width:])
    from safetensors.torch import load_file

    table = load_file(str(tmp_path / "reward_table" / "train.safetensors"))
    assert table["features"].shape == (24, 2 * c.hidden_size + width)
    assert model.encode(images, num_tokens="auto").lengths.shape == (3,)


def test_policy_token_features_must_be_a_bool():
    from adatok_vlm.tokenizer import AdaTokConfig

    with pytest.raises(TypeError, match="policy_token_features must be a bool"):
        AdaTokConfig.from_preset("adatok-tiny", policy_token_features="yes")
