"""Every trainer under DeepSpeed ZeRO-2 and ZeRO-3, proven with real 2-process CPU jobs (gloo).

Two launches do all the multi-process work (each costs ~10-20 s of start-up, so each runs several
scenarios in turn through ``tests/ds_worker.py``):

* ZeRO-2 through ``accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml`` (the
  DeepSpeed config comes from the Accelerate YAML): stage 1 with its discriminator, a stage-1 run to
  compare with one process, stage 2, the DiT.
* ZeRO-3 through ``torchrun`` with ``--train.deepspeed zero3``: stage 1 with its discriminator,
  stage 2, the DiT straight and the DiT stopped at step 2 then resumed.

The tests then read what the runs wrote. DeepSpeed JIT-builds a communication op on its first use
(about a minute); ``TORCH_EXTENSIONS_DIR`` (the Makefile exports it) keeps it between runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import tiny_model

pytestmark = pytest.mark.timeout(900)

deepspeed = pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ds_worker.py"
TINY = {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
        "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_latent_tokens": 8}
DATA = ["--data.dataset", "natural_crops", "--data.num_crops", "64"]
STEPS = 4


# ---------------------------------------------------------------------------------------------
# scenario flags (tiny models, a fixed batch: data.limit = the global batch)
# ---------------------------------------------------------------------------------------------
def _model_flags(model: dict) -> list[str]:
    return [x for k, v in model.items() for x in (f"--model.{k}", json.dumps(v))]


def tokenizer_flags(out, batch_size=8, gan=True, extra=()):
    flags = ["--output_dir", str(out), "--max_steps", str(STEPS), "--seed", "3", "--train.batch_size", str(batch_size),
             "--train.lr", "3e-3", "--train.warmup_steps", "0", "--train.lr_schedule", "constant",
             "--train.log_every", "1", "--train.sample_every", "2", "--train.save_every", "2",
             "--train.num_threads", "1", *DATA, "--data.limit", "16"]
    if gan:
        flags += ["--loss.gan_weight", "0.1", "--loss.gan_start_step", "1", "--loss.disc_base_channels", "8",
                  "--loss.disc_num_layers", "2"]
    model = dict(TINY)
    if not gan:
        model["ntm_min_tokens"] = 8     # NTM keeps every token: the run is a pure function of the data
    return flags + _model_flags(model) + list(extra)


def policy_flags(stage1, out, extra=()):
    return ["--tokenizer", str(stage1), "--output_dir", str(out), "--max_steps", str(STEPS), "--seed", "1",
            "--train.batch_size", "8", "--train.lr", "1e-2", "--train.warmup_steps", "0",
            "--train.lr_schedule", "constant", "--train.log_every", "1", "--train.save_every", "2",
            "--train.num_threads", "1", *DATA, "--data.limit", "16", *extra]


def vlm_flags(root, out, extra=()):
    return ["--config", str(REPO / "configs" / "vlm" / "tiny.yaml"), "--tokenizer", str(root / "vlm_assets" / "adatok"),
            "--output_dir", str(out), "--seed", "0", "--max_steps", str(STEPS), "--data.dataset",
            str(root / "vlm_assets" / "data"), "--data.caption_column", "text", "--data.limit", "8",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.num_threads", "1", "--train.warmup_steps",
            "0", "--train.lr_schedule", "constant", "--train.save_every", "2", *extra]


def dit_flags(cache, out, max_steps=STEPS, extra=()):
    return ["--config", str(REPO / "configs" / "dit" / "dit-tiny.yaml"), "--data.tokens", str(cache / "tokens"),
            "--output_dir", str(out), "--max_steps", str(max_steps), "--train.time_budget_s", "null",
            "--train.batch_size", "16", "--data.limit", "32", "--train.lr", "2e-3", "--train.warmup_steps", "0",
            "--train.lr_schedule", "constant", "--train.ema_decay", "0.9", "--train.num_threads", "1",
            "--train.log_every", "1", "--train.save_every", "2", "--train.sample_every", "2",
            "--tokenizer", str(cache / "tokenizer"), "--sample.per_class", "1", "--sample.num_steps", "2", *extra]


# ---------------------------------------------------------------------------------------------
# the two launches
# ---------------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adatok-vlm" / "torch_extensions"))
    env.setdefault("ADATOK_CACHE", str(Path.home() / ".cache" / "adatok-vlm"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(key, None)
    return env


def _launch(command: list[str], plan: list[dict], root: Path, name: str) -> dict:
    plan_path = root / f"{name}.json"
    plan_path.write_text(json.dumps(plan))
    done = subprocess.run([*command, str(WORKER), str(plan_path)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=480)
    (root / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-6000:]
        pytest.fail(f"the 2-process {name} launch failed (rc {done.returncode}):\n{tail}")
    results = [json.loads(line) for line in Path(f"{plan_path}.results").read_text().splitlines()]
    assert [r["name"] for r in results] == [s["name"] for s in plan]
    return {r["name"]: r for r in results} | {"_log": done.stdout + done.stderr}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    # Inputs: a stage-1 tokenizer for stage 2, a token cache for the DiT (one process, here).
    from adatok_vlm.training.extract_tokens import main as extract

    model = tiny_model(num_latent_tokens=8, seed=1)
    model.save_pretrained(root / "stage1")
    model.enable_policy()
    model.save_pretrained(root / "cache" / "tokenizer")
    extract(["--tokenizer", str(root / "cache" / "tokenizer"), "--output_dir", str(root / "cache" / "tokens"),
             *DATA, "--extract.num_threads", "1"])
    from test_train_vlm import tiny_adatok, write_captioned_set

    tiny_adatok(policy=True).save_pretrained(root / "vlm_assets" / "adatok")
    write_captioned_set(root / "vlm_assets" / "data")

    zero2 = [
        {"name": "tokenizer", "trainer": "train_tokenizer", "argv": tokenizer_flags(root / "z2" / "tokenizer")},
        {"name": "match", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z2" / "match", gan=False, extra=["--train.save_every", "0",
                                                                          "--train.sample_every", "0"])},
        {"name": "accum", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z2" / "accum", batch_size=4, gan=False,
                                 extra=["--train.grad_accum", "2", "--train.save_every", "0",
                                        "--train.sample_every", "0"])},
        {"name": "policy", "trainer": "train_policy", "argv": policy_flags(root / "stage1", root / "z2" / "policy")},
        {"name": "dit", "trainer": "train_dit", "argv": dit_flags(root / "cache", root / "z2" / "dit")},
        {"name": "vlm", "trainer": "train_vlm", "argv": vlm_flags(root, root / "z2" / "vlm")},
        {"name": "vlm_lora", "trainer": "train_vlm",
         "argv": vlm_flags(root, root / "z2" / "vlm_lora", extra=["--train.finetune", "lora"])},
    ]
    z3 = ["--train.deepspeed", "zero3"]
    bf16 = ["--train.mixed_precision", "bf16"]
    zero3 = [
        {"name": "tokenizer", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z3" / "tokenizer", extra=[*z3, "--train.ema_decay", "0"])},
        {"name": "policy", "trainer": "train_policy",
         "argv": policy_flags(root / "stage1", root / "z3" / "policy", extra=z3)},
        {"name": "dit", "trainer": "train_dit", "argv": dit_flags(root / "cache", root / "z3" / "dit", extra=z3)},
        {"name": "dit_first_half", "trainer": "train_dit",
         "argv": dit_flags(root / "cache", root / "z3" / "resumed", max_steps=2, extra=z3)},
        {"name": "dit_resumed", "trainer": "train_dit",
         "argv": dit_flags(root / "cache", root / "z3" / "resumed", extra=[*z3, "--resume", "auto"])},
        {"name": "tokenizer_first_half", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z3" / "tokenizer_resumed",
                                 extra=[*z3, "--train.ema_decay", "0", "--max_steps", "2"])},
        {"name": "tokenizer_resumed", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z3" / "tokenizer_resumed", extra=[*z3, "--train.ema_decay", "0",
                                                                           "--resume", "auto"])},
        {"name": "dit_offload", "trainer": "train_dit",
         "argv": dit_flags(root / "cache", root / "offload" / "dit", extra=["--train.deepspeed", "zero3_offload"])},
        # bf16 engines: half-precision weights meet fp32 inputs, a fp32 discriminator, a fp32 copy for grids
        {"name": "dit_bf16", "trainer": "train_dit",
         "argv": dit_flags(root / "cache", root / "bf16" / "dit", extra=[*z3, *bf16, "--train.ema_decay", "0"])},
        {"name": "tokenizer_bf16", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "bf16" / "tokenizer", extra=["--train.deepspeed", "zero2", *bf16])},
        {"name": "tokenizer_accum", "trainer": "train_tokenizer",
         "argv": tokenizer_flags(root / "z3" / "tokenizer_accum", batch_size=4,
                                 extra=[*z3, "--train.grad_accum", "2", "--train.save_every", "0"])},
        {"name": "policy_bf16", "trainer": "train_policy",
         "argv": policy_flags(root / "stage1", root / "bf16" / "policy", extra=[*z3, *bf16])},
        # a reward table measured in two uneven chunks (9 rows), gathered, then the exact objective
        {"name": "policy_table", "trainer": "train_policy",
         "argv": policy_flags(root / "stage1", root / "z3" / "policy_table",
                              extra=[*z3, "--train.reward_table", "true", "--train.table_size", "9",
                                     "--train.batch_size", "4", "--train.val_size", "6",
                                     "--train.objective", "expected"])},
        # the VLM with LoRA, sharded (frozen LM included), then generation under ZeRO-3 with a different
        # length on each rank: without synced_gpus the rank that finishes first would leave the other
        # waiting in a parameter all-gather forever
        {"name": "vlm", "trainer": "train_vlm",
         "argv": vlm_flags(root, root / "z3" / "vlm", extra=[*z3, "--train.finetune", "lora"])},
        {"name": "vlm_full", "trainer": "train_vlm", "argv": vlm_flags(root, root / "z3" / "vlm_full", extra=z3)},
        {"name": "vlm_generate", "trainer": "vlm_generate_zero3",
         "argv": [str(root / "z3" / "vlm" / "model"), str(root / "z3" / "vlm_generate")]},
    ]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "accelerate" / "cpu_2proc_zero2.yaml"), "--main_process_port",
                  str(_free_port())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    return {"root": root, "zero2": _launch(accelerate, zero2, root, "zero2"),
            "zero3": _launch(torchrun, zero3, root, "zero3")}


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def column(out: Path, key: str) -> list[float]:
    return [r[key] for r in log_rows(out)]


def finite_and_falling(values: list[float]) -> bool:
    return all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]


# ---------------------------------------------------------------------------------------------
# the trainers under ZeRO-2 and ZeRO-3
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_stage1_trains_with_its_discriminator(runs, stage):
    out = runs["root"] / ("z2" if stage == "zero2" else "z3") / "tokenizer"
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert finite_and_falling([r["loss"] for r in rows]), [r["loss"] for r in rows]
    assert all(r["d_loss"] > 0 for r in rows[1:]), "the discriminator trains once the GAN is on"
    assert all(r["gan_weight"] > 0 for r in rows[1:]), "the adaptive GAN weight is computed under DeepSpeed"
    accum = column(runs["root"] / stage.replace("zero", "z") / "tokenizer_accum", "loss") if stage == "zero3" else []
    assert all(torch.isfinite(torch.tensor(accum))), "ZeRO-3 + discriminator + accumulation"
    ckpt = out / "checkpoints" / f"step-{STEPS:08d}"
    for name in ("discriminator.safetensors", "disc_optimizer.optim.safetensors", "model/config.json",
                 "rng-rank00000.safetensors", "rng-rank00001.safetensors"):
        assert (ckpt / name).is_file(), name
    assert (out / "samples" / f"step-{STEPS:08d}.png").is_file()
    assert "global batch 16 = 8 micro x 1 accumulation x 2 processes" in runs[stage]["_log"]
    assert f"DeepSpeed ZeRO-{stage[-1]}" in runs[stage]["_log"]


@pytest.mark.parametrize("trainer", ["dit", "tokenizer", "policy"])
def test_bf16_engines_train_and_export_fp32_master_weights(runs, trainer):
    out = runs["root"] / "bf16" / trainer
    assert finite_and_falling(column(out, "curve_loss" if trainer == "policy" else "loss"))
    if trainer != "policy":
        assert (out / "samples" / f"step-{STEPS:08d}.png").is_file()
    model = transformers.AutoModel.from_pretrained(out / "model")
    assert model.dtype == torch.float32
    assert trainer != "policy" or model.has_policy


def test_zero2_and_zero3_follow_the_same_curve(runs):
    z2 = column(runs["root"] / "z2" / "tokenizer", "loss")
    z3 = column(runs["root"] / "z3" / "tokenizer", "loss")
    assert z2 == pytest.approx(z3, abs=1e-5)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The comparison run: one process, no DeepSpeed, the same global batch of 16 (fp32)."""
    from adatok_vlm.training.train_tokenizer import main

    out = tmp_path_factory.mktemp("single")
    main(tokenizer_flags(out, batch_size=16, gan=False, extra=["--train.save_every", "0", "--train.sample_every", "0"]))
    return out


def test_zero2_on_two_processes_matches_one_process_with_the_same_global_batch(runs, single_process):
    single = column(single_process, "loss")
    double = column(runs["root"] / "z2" / "match", "loss")
    assert len(single) == len(double) == STEPS
    assert single[-1] < single[0]
    assert double == pytest.approx(single, abs=1e-4), (single, double)


def test_zero2_with_accumulation_reaches_the_same_weights_as_one_process(runs, single_process):
    """2 processes x 4 images x 2 accumulation steps = one process x 16 images, step for step."""
    from safetensors.torch import load_file

    from adatok_vlm.training.export import consolidate

    assert "global batch 16 = 4 micro x 2 accumulation x 2 processes" in runs["zero2"]["_log"]
    sharded, _, _ = consolidate(runs["root"] / "z2" / "accum")
    reference = load_file(str(single_process / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))
    state = sharded.state_dict()
    assert state.keys() == reference.keys()
    torch.manual_seed(3)                                   # the trainers' init: seed, then build
    initial = type(sharded)(sharded.config).state_dict()
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    gap = max(float((state[k] - reference[k]).abs().max()) for k in reference)
    assert moved > 1e-3, "four steps must move the weights"
    assert gap < 2e-5, (gap, moved)


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_stage2_policy_trains_and_exports(runs, stage):
    out = runs["root"] / stage / "policy"
    assert all(torch.isfinite(torch.tensor(column(out, "loss"))))
    assert finite_and_falling(column(out, "curve_loss"))
    model = transformers.AutoModel.from_pretrained(out / "model").eval()
    assert model.has_policy
    enc = model.encode(torch.rand(3, 3, 32, 32), num_tokens="auto")
    assert enc.lengths.shape == (3,)


@pytest.mark.parametrize("stage", ["z2", "z3", "offload"])
def test_dit_trains_under_zero(runs, stage):
    out = runs["root"] / stage / "dit"
    assert finite_and_falling(column(out, "loss"))
    assert (out / "samples" / f"step-{STEPS:08d}.png").is_file()
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / "ema.safetensors").is_file()
    assert transformers.AutoModel.from_pretrained(out / "model").config.model_type == "adatok_dit"


# ---------------------------------------------------------------------------------------------
# checkpoints: consolidation and resume
# ---------------------------------------------------------------------------------------------
def test_zero3_checkpoint_consolidates_to_the_trained_model(runs, tmp_path):
    from adatok_vlm.training.export import main as export

    out = runs["root"] / "z3" / "tokenizer"
    exported = export(["--checkpoint", str(out), "--out", str(tmp_path / "tokenizer")])
    consolidated = transformers.AutoModel.from_pretrained(exported).eval()
    trained = transformers.AutoModel.from_pretrained(out / "model").eval()   # gathered by the run itself
    assert transformers.AutoImageProcessor.from_pretrained(exported).size == 32
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        a, b = consolidated.encode(x, num_tokens=5), trained.encode(x, num_tokens=5)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(consolidated.decode(a.tokens, a.lengths), trained.decode(b.tokens, b.lengths))

    policy = runs["root"] / "z3" / "policy"
    exported = export(["--checkpoint", str(policy / "checkpoints"), "--out", str(tmp_path / "policy")])
    consolidated = transformers.AutoModel.from_pretrained(exported).eval()
    trained = transformers.AutoModel.from_pretrained(policy / "model").eval()
    with torch.no_grad():
        assert torch.equal(consolidated.encode(x, num_tokens={"mean_budget": 4}).lengths,
                           trained.encode(x, num_tokens={"mean_budget": 4}).lengths)
        features = consolidated.policy_features(consolidated.forward_encoder(x)[1])
        assert torch.equal(consolidated.policy(features), trained.policy(features))


def test_zero3_resume_continues_the_step_count_and_the_curve(runs):
    resumed = runs["root"] / "z3" / "resumed"
    assert "resumed from" in runs["zero3"]["_log"] and runs["zero3"]["dit_resumed"]["summary"]["steps"] == STEPS
    assert [r["step"] for r in log_rows(resumed)] == [1, 2, 3, 4]
    state = json.loads((resumed / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS
    straight = column(runs["root"] / "z3" / "dit", "loss")
    assert column(resumed, "loss") == pytest.approx(straight, abs=1e-5)
    # stage 1: the engine's shards plus the replicated discriminator, its optimizer and per-rank RNG
    resumed = runs["root"] / "z3" / "tokenizer_resumed"
    assert [r["step"] for r in log_rows(resumed)] == [1, 2, 3, 4]
    for key in ("loss", "d_loss", "gan_weight"):
        assert column(resumed, key) == pytest.approx(column(runs["root"] / "z3" / "tokenizer", key), abs=1e-5), key


def test_a_zero_checkpoint_refuses_another_world_size(runs, tmp_path):
    from adatok_vlm.training.checkpointing import CheckpointManager

    src = runs["root"] / "z3" / "dit" / "checkpoints" / f"step-{STEPS:08d}"
    ckpt = CheckpointManager(tmp_path, {}, {}, engines={"model": object()}, world_size=4)
    with pytest.raises(ValueError, match="written by 2 processes"):
        ckpt.load(src)


def test_ranks_keep_their_own_data_randomness(runs):
    """Data randomness is seeded per rank and checkpointed per rank (the init is the same on every
    rank: ``assert_replicas_match`` stops a run whose ranks built different weights)."""
    from safetensors.torch import load_file

    ckpt = runs["root"] / "z2" / "tokenizer" / "checkpoints" / f"step-{STEPS:08d}"
    rank0 = load_file(str(ckpt / "rng-rank00000.safetensors"))["torch_cpu"]
    rank1 = load_file(str(ckpt / "rng-rank00001.safetensors"))["torch_cpu"]
    assert not torch.equal(rank0, rank1)


# ---------------------------------------------------------------------------------------------
# the configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_leave_the_batch_arithmetic_to_the_trainer(name):
    cfg = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto"
    if cfg["zero_optimization"]["stage"] == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_accelerate_configs_name_existing_deepspeed_files():
    files = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert {f.name for f in files} >= {"single_gpu.yaml", "1x8_zero2.yaml", "1x8_zero3.yaml", "2x8_zero3_node0.yaml",
                                       "2x8_zero3_node1.yaml", "cpu_2proc_zero2.yaml"}
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        ds = cfg.get("deepspeed_config", {})
        if "deepspeed_config_file" in ds:
            assert (REPO / ds["deepspeed_config_file"]).is_file(), f.name
            assert "mixed_precision" not in cfg, f"{f.name}: Accelerate refuses it next to a deepspeed_config_file"
        if cfg["num_machines"] > 1:
            assert cfg["num_processes"] == 8 * cfg["num_machines"] and cfg["rdzv_backend"] == "static"
    ranks = [yaml.safe_load((REPO / "configs" / "accelerate" / f"2x8_zero3_node{i}.yaml").read_text())["machine_rank"]
             for i in (0, 1)]
    assert ranks == [0, 1]
    hosts = (REPO / "configs" / "hostfile.example").read_text()
    assert "slots=8" in hosts


def test_the_replayed_adaptive_gan_weight_is_the_direct_one():
    """Under DeepSpeed the adaptive weight is computed on a replay of the decoder's last layer (no
    autograd pass through the engine); it must be the same number as VQGAN's direct formula."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from adatok_vlm.tokenizer.losses import AdaTokStage1Loss
    from adatok_vlm.training.train_tokenizer import LastLayerInput, LossConfig, replayed_adaptive_weight

    model = tiny_model(seed=2)
    torch.manual_seed(0)
    loss_fn = AdaTokStage1Loss(perceptual_weight=0.0, perceptual_net=None, gan_weight=0.5, gan_start_step=0,
                               adaptive_gan_weight=True, disc_base_channels=8, disc_num_layers=2).eval()
    capture = LastLayerInput(model.decoder.to_patches)
    x = torch.rand(4, 3, 32, 32)
    out = model(x, num_tokens=torch.tensor([2, 5, 8, 12]))
    _, logs = loss_fn.generator_loss(x, out.reconstruction, out.loss, 1, model.last_layer_weight())
    no_deepspeed = SimpleNamespace(distributed_type=DistributedType.NO)
    replayed = replayed_adaptive_weight(no_deepspeed, model, loss_fn, capture.h, out.target_latents, x, LossConfig())
    assert logs["gan_weight"] > 0
    assert replayed == pytest.approx(logs["gan_weight"], rel=1e-5)


def test_one_process_without_a_launcher_runs_deepspeed(runs, tmp_path):
    """``python -m ... --train.deepspeed zero2`` alone (one GPU, ZeRO-offload style): a world of one."""
    argv = dit_flags(runs["root"] / "cache", tmp_path, max_steps=2,
                     extra=["--train.deepspeed", "zero2", "--train.sample_every", "0"])
    done = subprocess.run([sys.executable, "-m", "adatok_vlm.training.train_dit", *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "global batch 16 = 16 micro x 1 accumulation x 1 processes" in done.stdout
    assert "DeepSpeed ZeRO-2" in done.stdout
    assert (tmp_path / "checkpoints" / "step-00000002" / "model" / "config.json").is_file()


def test_reward_table_measured_across_ranks_equals_one_process(runs):
    """Two ranks each measure a chunk of the table and gather it: the rows are the single-process ones."""
    from adatok_vlm.training.config import parse_config
    from adatok_vlm.training.reward_table import measure_reward_table
    from adatok_vlm.training.data_setup import build_train_data
    from adatok_vlm.training.train_policy import PolicyTrainingConfig
    from safetensors.torch import load_file

    out = runs["root"] / "z3" / "policy_table"
    saved = load_file(str(out / "reward_table" / "train.safetensors"))
    assert saved["rl"].shape[0] == 9 and (out / "reward_table" / "val.safetensors").is_file()
    assert "val_reward" in log_rows(out)[0]
    model = transformers.AutoModel.from_pretrained(runs["root"] / "stage1").eval()
    model.enable_policy()
    cfg, _ = parse_config(PolicyTrainingConfig, policy_flags(runs["root"] / "stage1", out))
    data, _ = build_train_data(cfg, model.config)
    table = measure_reward_table(model, [data.batch(saved["rows"].tolist())["pixel_values"]], model.length_grid)
    exported = transformers.AutoModel.from_pretrained(out / "model")
    assert exported.config.quality_margin != 0.0     # calibrated on the held-out table (rows 10..15)
    assert torch.allclose(table.rl, saved["rl"], rtol=1e-4, atol=1e-7)
    assert torch.allclose(table.features, saved["features"], atol=1e-5)


@pytest.mark.parametrize("run", ["z2/vlm", "z2/vlm_lora", "z3/vlm", "z3/vlm_full"])
def test_vlm_trains_under_zero_and_exports(runs, run):
    """train_vlm as one DeepSpeed engine, full fine-tuning and LoRA (under ZeRO-3 the frozen LM is sharded
    too): finite, falling losses averaged over ranks, engine checkpoints, and an export that generates
    in one process."""
    from adatok_vlm.sample_t2i import load_for_sampling

    out = runs["root"] / run
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert finite_and_falling([r["loss"] for r in rows if "loss" in r])
    assert (out / "checkpoints" / "step-00000004" / "model").is_dir()
    vlm, processor, info = load_for_sampling(str(out / "model"))
    ids = processor.tokenizer(["a blue disc"], return_tensors="pt").input_ids
    assert vlm.generate_images(ids, num_image_tokens=3, seed=0).lengths.tolist() == [3]


def test_vlm_generation_under_zero3_with_different_lengths_per_rank(runs):
    """Rank 0 writes 1 image token, rank 1 writes 4, through the sharded model with synced_gpus=True: both
    return (no hang), and each rank's tokens equal the unsharded model's for the same seed."""
    from adatok_vlm.sample_t2i import load_for_sampling

    vlm, processor, _ = load_for_sampling(str(runs["root"] / "z3" / "vlm" / "model"))
    ids = processor.tokenizer(["a blue disc"], return_tensors="pt").input_ids
    for rank, length in ((0, 1), (1, 4)):
        got = json.loads((runs["root"] / "z3" / f"vlm_generate.rank{rank}.json").read_text())
        assert got["lengths"] == [length]
        expected = vlm.generate_images(ids, num_image_tokens=length, seed=0).tokens
        assert torch.allclose(torch.tensor(got["tokens"]), expected, atol=1e-4), rank
