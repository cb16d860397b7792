"""The rehearsal (training/rehearse.py) at the tiny preset: every stage of the paper's pipeline runs, through
the real commands (``adatok`` verbs, ``accelerate launch`` ZeRO-2 on 2 CPU processes, ``torchrun``), and
``summary.json`` reports each as ok with what it wrote. One rehearsal serves every test of the module.

The rehearsal is a dozen subprocesses, each paying Python's and DeepSpeed's start-up, so it takes minutes on a
loaded machine whatever the preset; the tests below only read what it wrote.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from adatok_vlm.training import rehearse

pytestmark = pytest.mark.timeout(1800)
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearse")
    summary = rehearse.main(["--output_dir", str(out), "--preset", "adatok-tiny", "--threads", "1", "--steps", "2"])
    return out, summary


def test_every_stage_runs_and_the_summary_reports_each_as_ok(rehearsal):
    out, returned = rehearsal
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert [s["stage"] for s in summary["stages"]] == list(rehearse.STAGES)
    failed = {s["stage"]: s["error"] for s in summary["stages"] if s["status"] != "ok"}
    assert not failed, failed
    for stage in summary["stages"]:
        assert stage["wall_s"] > 0 and stage["peak_rss_gb"] > 0, stage
        assert stage["wrote"] and all((out / w).exists() for w in stage["wrote"] if "*" not in w and "<" not in w)
    table = (out / "summary.md").read_text()
    assert all(f"| {stage} | ok |" in table for stage in rehearse.STAGES)


def test_training_stages_report_their_steps_and_rates_from_their_logs(rehearsal):
    out, summary = rehearsal
    stages = {s["stage"]: s for s in summary["stages"]}
    for name in ("stage1", "stage2", "dit", "vlm"):
        rows = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step_time_s" in r]
        assert stages[name]["steps"] == 2 == steps[-1]["step"]
        assert stages[name]["s_per_step"] == pytest.approx(steps[-1]["step_time_s"])   # the steps after the first
        assert stages[name]["s_per_step"] > 0 and stages[name]["images_per_s"] > 0


def test_stage1_ran_lpips_and_the_gan_under_two_processes_from_the_latent_cache(rehearsal):
    out, _ = rehearsal
    rows = [r for r in map(json.loads, (out / "stage1" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(r["perceptual"] > 0 and r["d_loss"] > 0 for r in rows)
    log = (out / "logs" / "stage1.log").read_text()
    assert "2 processes" in log and "latent" in log.lower()
    info = json.loads((out / "latents" / "cache_info.json").read_text())
    assert info["num_images"] == rehearse.PRESETS["adatok-tiny"].limit
    # torchrun's two ranks each encoded their own shard (not both the whole set as rank 0 of 1)
    cache_log = (out / "logs" / "cache-latents.log").read_text()
    assert "cache-latents rank 0" in cache_log and "cache-latents rank 1" in cache_log


def test_the_photo_folder_is_an_imagenet_layout_with_a_labelled_flat_val(rehearsal):
    out, _ = rehearsal
    preset = rehearse.PRESETS["adatok-tiny"]
    record = json.loads((out / "imagenet" / "classes.json").read_text())
    assert sorted(record["classes"]) == sorted(p.name for p in (out / "imagenet" / "train").iterdir())
    members = [m for names in record["classes"].values() for m in names]
    assert len(members) == len(set(members))          # every photo in exactly one class
    for name in record["classes"]:
        assert len(list((out / "imagenet" / "train" / name).glob("*.JPEG"))) == preset.train_per_class
    lines = (out / "imagenet" / "val" / "val.txt").read_text().split("\n")[:-1]
    assert len(lines) == preset.num_classes * preset.val_per_class
    assert all((out / "imagenet" / "val" / line.split()[0]).is_file() for line in lines)
    reference = np.load(out / "reference.npz")["arr_0"]
    assert reference.shape == (len(lines), preset.image_size, preset.image_size, 3) and reference.dtype == np.uint8


def test_the_evaluations_wrote_reconstruction_metrics_and_sample_distances(rehearsal):
    out, _ = rehearsal
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "fd_vgg16" in text and "rmse" in text and "auto" in text
    generated = json.dumps([json.loads(p.read_text()) for p in (out / "eval-samples").glob("*.json")])
    assert "fd_vgg16" in generated and "precision" in generated


def test_latent_stats_with_only_a_vae_path_measures_at_the_default_adatok_s_size(rehearsal, tmp_path):
    """The README's ``adatok latent-stats --model.vae_path DIR ...`` names no preset: the section's default
    (adatok-s, 256x256) must survive the override (the adatok-s rehearsal found it measuring 32x32 images)."""
    from adatok_vlm.training.convert_vae import latent_stats_main

    out, _ = rehearsal
    record = latent_stats_main(["--model.vae_path", str(out / "vae"), "--data.dataset", str(out / "imagenet"),
                                "--data.num_workers", "0", "--limit", "1", "--batch_size", "1",
                                "--write_config", "false", "--out", str(tmp_path / "stats.json")])
    assert record["image_size"] == 256


def test_bad_arguments_are_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        rehearse.main(["--output_dir", str(tmp_path), "--steps", "0"])
    with pytest.raises(FileNotFoundError, match="--vae_path"):
        rehearse.main(["--output_dir", str(tmp_path), "--vae_path", str(tmp_path / "nothing")])
