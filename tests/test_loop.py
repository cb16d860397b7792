"""The one training loop (``training.loop``) under each of the four trainers: Ctrl-C leaves a resumable
checkpoint and one line, resuming a finished run takes no step, a NaN closes the logger and the bar;
plus the shared config's range checks, the bar's step estimate and the CPU thread rule."""

import json
import os
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_vlm import tiny_adatok, write_captioned_set

from adatok_vlm.training import loop, train_dit, train_policy, train_tokenizer, train_vlm
from adatok_vlm.training.engine import NonFiniteLossError, RunLogger, cores_busy_now, default_threads
from adatok_vlm.training.extract_tokens import main as extract

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_TOKENIZER = ["--model.preset", "adatok-tiny", "--model.hidden_size", "32", "--model.decoder_hidden_size", "32",
                   "--model.num_attention_heads", "2", "--model.decoder_num_attention_heads", "2",
                   "--model.num_encoder_layers", "1", "--model.num_decoder_layers", "1", "--model.num_latent_tokens", "8"]
TRAINERS = {"tokenizer": (train_tokenizer, train_tokenizer.TokenizerStage),
            "policy": (train_policy, train_policy.PolicyStage),
            "dit": (train_dit, train_dit.DiTStage),
            "vlm": (train_vlm, train_vlm.VLMStage)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, adatok_cache):
    """A tiny AdaTok with a policy, 8 captioned and labelled pictures, and their token cache."""
    root = tmp_path_factory.mktemp("loop_assets")
    tiny_adatok(policy=True).save_pretrained(root / "adatok")
    write_captioned_set(root / "data")
    extract(["--tokenizer", str(root / "adatok"), "--output_dir", str(root / "tokens"), "--data.dataset",
             str(root / "data"), "--extract.num_threads", "1"])
    return root


def argv(name: str, assets: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    common = ["--output_dir", str(out), "--max_steps", str(max_steps), "--train.batch_size", "4",
              "--train.log_every", "1", "--train.save_every", "0", "--train.num_threads", "1",
              "--train.warmup_steps", "0", "--train.lr_schedule", "constant"]
    own = {"tokenizer": [*SMALL_TOKENIZER, "--data.dataset", str(assets / "data"), "--train.sample_every", "0"],
           "policy": ["--tokenizer", str(assets / "adatok"), "--data.dataset", str(assets / "data")],
           "dit": ["--config", str(CONFIGS / "dit" / "dit-tiny.yaml"), "--data.tokens", str(assets / "tokens"),
                   "--train.time_budget_s", "null", "--train.sample_every", "0"],
           "vlm": ["--config", str(CONFIGS / "vlm" / "tiny.yaml"), "--tokenizer", str(assets / "adatok"),
                   "--data.dataset", str(assets / "data"), "--data.caption_column", "text", "--data.limit", "8"]}
    return [*own[name], *common, *extra]


def step_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def checkpoint_tensors(step_dir: Path) -> dict:
    return {f.name: load_file(str(f)) for f in sorted(step_dir.glob("*.safetensors")) if not f.name.startswith("rng")}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_ctrl_c_saves_one_line_then_resume_and_a_finished_run_takes_no_step(name, assets, tmp_path, capsys,
                                                                             monkeypatch):
    module, stage = TRAINERS[name]
    real_step = stage.step

    def interrupted(self, batch, state):
        if state["step"] == 1:
            raise KeyboardInterrupt
        return real_step(self, batch, state)

    with monkeypatch.context() as patch:
        patch.setattr(stage, "step", interrupted)
        with pytest.raises(SystemExit) as stop:
            module.main(argv(name, assets, tmp_path, 2))
    assert stop.value.code == 130
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted at step 1; resume with --resume auto"), out
    assert "Traceback" not in err
    assert json.loads((tmp_path / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())["step"] == 1

    summary = module.main(argv(name, assets, tmp_path, 2, "--resume", "auto"))
    assert summary["steps"] == 2 and "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in step_rows(tmp_path)] == [1, 2]
    before = checkpoint_tensors(Path(summary["checkpoint"]))

    again = module.main(argv(name, assets, tmp_path, 2, "--resume", "auto"))   # the run is finished
    assert again["steps"] == 2 and "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in step_rows(tmp_path)] == [1, 2]                   # no step taken, none logged
    after = checkpoint_tensors(Path(again["checkpoint"]))
    assert before.keys() == after.keys() and len(before) >= 2
    for file, tensors in before.items():
        assert all(tensors[k].equal(after[file][k]) for k in tensors), file


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_a_nan_stops_every_trainer_closing_its_logger_and_bar(name, assets, tmp_path, monkeypatch):
    module, stage = TRAINERS[name]
    real_step = stage.step
    loggers, bars = [], []

    def poisoned(self, batch, state):
        checks = real_step(self, batch, state)
        return {**checks, "loss": checks["loss"] * float("nan")} if state["step"] == 1 else checks

    class RecordedLogger(RunLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loggers.append(self)

    class RecordedBar(loop.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(stage, "step", poisoned)
    monkeypatch.setattr(loop, "RunLogger", RecordedLogger)
    monkeypatch.setattr(loop, "tqdm", RecordedBar)
    with pytest.raises(NonFiniteLossError, match="at step 1") as info:
        module.main(argv(name, assets, tmp_path, 3))
    assert len(loggers) == 1 and loggers[0].file.closed
    assert len(bars) == 1 and bars[0].disable                      # tqdm.close() disables the bar
    assert json.loads((Path(info.value.checkpoint) / "trainer_state.json").read_text())["step"] == 1
    assert [r["step"] for r in step_rows(tmp_path)] == [1]


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("grad_accum", 0), ("batch_size", 0), ("lr", 0.0),
                                          ("betas", [0.9]), ("betas", [0.9, 1.0]), ("keep_checkpoints", 0),
                                          ("log_every", 0), ("save_every", -1), ("lr_schedule", "cosin"),
                                          ("warmup_steps", -1), ("time_budget_s", 0.0)])
@pytest.mark.parametrize("config", [train_tokenizer.TrainConfig, train_policy.PolicyTrainConfig,
                                    train_dit.DiTTrainConfig, train_vlm.VLMTrainConfig])
def test_loop_config_ranges_name_the_field(config, field, value):
    assert issubclass(config, loop.LoopConfig)
    with pytest.raises(ValueError, match=rf"train\.{field} must be .*got {value!r}".replace("[", r"\[")):
        config(**{field: value})


def test_every_trainer_config_builds_with_its_own_defaults():
    assert train_tokenizer.TrainConfig().betas == [0.9, 0.99] and train_dit.DiTTrainConfig().max_steps == 100_000
    assert train_vlm.VLMTrainConfig().betas == [0.9, 0.95] and train_policy.PolicyTrainConfig().min_lr_ratio == 0.1


def test_the_bar_total_follows_whichever_budget_ends_the_run():
    assert loop.expected_steps(0, 0.0, 1000, None) == 1000
    assert loop.expected_steps(50, 10.0, 1000, None) == 1000
    assert loop.expected_steps(50, 10.0, 1000, 20.0) == 100         # half the time gone after 50 steps
    assert loop.expected_steps(50, 1.0, 1000, 60.0) == 1000         # the step budget ends it first
    assert loop.expected_steps(50, 30.0, 1000, 20.0) == 50          # past the budget: this is the last step


def test_cpu_threads_default_to_what_is_free():
    assert default_threads(16) == 16
    assert default_threads(16, local_world_size=2) == 8                # processes sharing the node split its cores
    assert default_threads(16, local_world_size=4, load=10.0) == 4
    assert default_threads(2, load=1.2) == 1                           # one core busy elsewhere
    assert default_threads(2, load=7.0) == 1 and default_threads(1, local_world_size=8) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat: the load-average fallback is used")
def test_busy_cores_are_measured_now_not_a_minute_ago():
    """A core spinning in another process counts as busy at once (the 1-minute load average would not see
    it for a while, and sees finished work for a minute after it ends)."""
    import subprocess
    import sys

    idle = cores_busy_now()
    assert idle is not None and 0.0 <= idle <= os.cpu_count() + 1e-6
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert cores_busy_now(interval=0.3) >= 0.8
    finally:
        spinner.kill()
        spinner.wait()
    assert cores_busy_now(stat="/nonexistent/stat") is None


def test_a_trainer_owns_its_output_dir(assets, tmp_path):
    """Through a real trainer: a fresh run into a finished run's folder is refused (nothing of the old run
    is touched), ``--overwrite true`` replaces it cleanly, and a changed architecture on ``--resume auto``
    names the differing field before any weights load."""
    from adatok_vlm.training.checkpointing import OutputDirNotEmptyError

    first = train_tokenizer.main(argv("tokenizer", assets, tmp_path, 1))
    before = checkpoint_tensors(Path(first["checkpoint"]))
    with pytest.raises(OutputDirNotEmptyError, match="overwrite"):
        train_tokenizer.main(argv("tokenizer", assets, tmp_path, 1))
    assert checkpoint_tensors(Path(first["checkpoint"])).keys() == before.keys()
    with pytest.raises(ValueError, match="num_latent_tokens"):
        train_tokenizer.main(argv("tokenizer", assets, tmp_path, 2, "--model.num_latent_tokens", "4",
                                  "--resume", "auto"))
    again = train_tokenizer.main(argv("tokenizer", assets, tmp_path, 2, "--overwrite", "true"))
    assert again["steps"] == 2 and [r["step"] for r in step_rows(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002"]
    card = (tmp_path / "model" / "README.md").read_text()   # the exported model's card knows its run
    assert "| steps | 2 |" in card and str(assets / "data") in card, card


@pytest.mark.parametrize("name", ["tokenizer", "dit"])
def test_a_misspelt_model_field_is_named(name, assets, tmp_path):
    """``model: {hiden_size: 64}`` was silently ignored (rc 0); now the run stops naming it and the field meant."""
    module = TRAINERS[name][0]
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        module.main(argv(name, assets, tmp_path, 1, "--model.hiden_size", "64"))
    assert not (tmp_path / "checkpoints").exists()
