"""`make demo`'s pipeline end to end at toy scale (natural photos): both stages, every promised file."""

import json

import transformers

from adatok_vlm.training.demo import main


def test_demo_writes_every_file_it_promises(tmp_path, monkeypatch):
    monkeypatch.setenv("ADATOK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    metrics = main([
        "--output_dir", str(out), "--data.limit", "256", "--eval_limit", "64",
        "--train.max_steps", "6", "--train.batch_size", "16",
        "--train.warmup_steps", "2", "--train.save_every", "0", "--train.sample_every", "0",
        "--model.hidden_size", "32", "--model.decoder_hidden_size", "32", "--model.num_attention_heads", "2",
        "--model.decoder_num_attention_heads", "2", "--model.num_encoder_layers", "1",
        "--model.num_decoder_layers", "1",
        "--policy.train.max_steps", "4", "--policy.train.batch_size", "16",
        "--policy.train.table_size", "64", "--policy.train.val_size", "32",
    ])
    for name in ("reconstructions.png", "rmse_vs_tokens.png", "rqpr_vs_tokens.png", "metrics.json",
                 "ablation.json", "ablation.md", "lengths_hist.png", "fig3_rmse_vs_tokens.png",
                 "fig5_rqpr_vs_tokens.png", "fig6_reward_landscape.png", "policy/policy_val_reward.png",
                 "policy/reward_table/train.safetensors", "lengths_ordered.png", "length_correlations.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    m = saved["num_latent_tokens"]
    assert sorted(int(k) for k in saved["per_length"]) == [1, 2, 4, 8, 16, 32][: len(saved["per_length"])]
    assert str(m) in saved["per_length"]
    for row in saved["per_length"].values():
        assert set(row) == {"rmse", "psnr", "rqpr"}
    for key in ("images_per_s", "wall_s", "num_parameters"):
        assert saved[key] > 0
    # the whole demo's wall time (both stages) with the load around it: what the README's timing cites
    assert saved["demo"]["wall_s"] > saved["wall_s"] and len(saved["demo"]["load_average_before"]) == 3
    ablation = json.loads((out / "ablation.json").read_text())
    assert [r["method"] for r in ablation["rows"]] == ["fixed", "truncate_fixed", "truncate_mean", "search", "search_paper", "ata",
                                                           "oracle", "oracle_continuous"]
    model = transformers.AutoModel.from_pretrained(out / "model")
    assert model.has_policy
    assert metrics["per_length"] == saved["per_length"]
    assert "rmse_full_le_0.5x_m_over_8" in saved["quality_checks"]
    correlations = json.loads((out / "length_correlations.json").read_text())
    assert correlations["num_images"] == 64 and set(correlations) >= {"spearman_oracle", "spearman_png_size"}
