"""Train the class-conditional DiT over variable-length AdaTok tokens with flow matching (paper App. B).

    python -m adatok_vlm.training.extract_tokens --tokenizer outputs/demo/model --output_dir outputs/tokens
    python -m adatok_vlm.training.train_dit --config configs/dit/dit-tiny.yaml \
        --data.tokens outputs/tokens --output_dir outputs/dit --tokenizer outputs/demo/model
    accelerate launch -m adatok_vlm.training.train_dit --config configs/dit/base.yaml --model.preset dit-b ...

The token cache (``extract_tokens``) fixes the data-dependent parts of the model: ``token_dim``,
``max_tokens``, the classes (``id2label``), the per-channel token statistics (the DiT works on
normalised tokens) and the per-class length histograms (``generate`` draws ``L ~ p(L | y)``).
Batches group similar lengths (``LengthGroupedBatchSampler``) and pad to the batch's longest
(``VarLenCollator``); the loss is the masked flow-matching velocity MSE (``flow_matching_loss``) with
class dropout for classifier-free guidance. Warm-up + cosine LR, EMA, checkpoints via
``CheckpointManager``, ``--resume auto`` continues bit for bit (the noise, times and class dropout
of each batch are drawn from a generator seeded by (seed, rank, epoch, batch), not from a global
stream). With ``--tokenizer`` the run writes sample grids (rows = classes) every
``train.sample_every`` steps. The EMA model is exported with ``save_pretrained`` to
``<output_dir>/model`` (loads with ``AutoModel``; ``adatok sample-c2i --dit`` takes it).

Under DeepSpeed ZeRO-2/3 (``--train.deepspeed zero3``, or a DeepSpeed ``accelerate launch``) the DiT
and its AdamW form one engine; every rank calls it once per micro-batch whatever its batch's padded
length, so length-grouped batches stay in lock-step. The EMA is a whole copy taken before ``prepare``
and updated from gathered weights under ZeRO-3; sample grids and the export use it (or a consolidated
copy without EMA); logged losses are averaged over ranks.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..generator import (AdaTokDiT, AdaTokDiTConfig, ClassToImagePipeline, LengthGroupedBatchSampler, VarLenCollator,
                         flow_matching_loss, padding_fraction)
from ..generator.sample_c2i import class_grid, class_names_from_config, model_fingerprint, to_uint8
from .checkpointing import CheckpointManager
from .config import parse_config
from .distributed import (assert_replicas_match, describe_batch, final_model, half_precision_autocast, materialize,
                          mean_over_ranks, param_gatherer, stop_if_non_finite, uses_deepspeed, zero_stage)
from .engine import EMA, RunLogger, configure_threads, lr_at, optimizer_step, run_progress, set_lr
from .extract_tokens import TokenCache
from .launch import make_accelerator

# Fields of AdaTokDiTConfig that the token cache decides; the model section may not override them.
DATA_FIELDS = ("token_dim", "max_tokens", "num_classes", "length_histograms", "token_mean", "token_std", "id2label")


# =============================================================================================
# config
# =============================================================================================
@dataclass
class TokenDataConfig:
    tokens: str = "outputs/tokens"           # an extract_tokens output folder
    limit: int | None = None                 # train on the first N cached images only
    pad_to_multiple_of: int | None = None    # e.g. 8 on GPUs (fewer distinct shapes)
    mega_batch_mult: int = 50                # LengthGroupedBatchSampler: sort windows of this many batches
    num_workers: int = 0


@dataclass
class DiTTrainConfig:
    output_dir: str = "outputs/dit"
    seed: int = 0
    max_steps: int = 100_000
    time_budget_s: float | None = None       # stop (and finish the LR schedule) within this wall time
    batch_size: int = 256                    # per device
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.9999                # 0 disables EMA (the raw model is exported)
    time_distribution: str = "logit_normal"  # flow time t: logit_normal (SD3) | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mixed_precision: str = "auto"
    num_threads: int | None = None
    log_every: int = 50
    sample_every: int = 5000                 # sample grids (needs --tokenizer); 0 disables
    save_every: int = 5000
    keep_checkpoints: int = 2
    resume: str | None = None                # "auto" | a checkpoint folder
    export: bool = True
    deepspeed: str | None = None             # DeepSpeed JSON (configs/deepspeed/zero2.json) or its name ("zero3")


@dataclass
class SampleConfig:
    """The sample grids written during training (fixed seed: the same noise at every step)."""

    max_classes: int = 10                    # rows: the first classes of the data
    per_class: int = 8
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: int = 0


@dataclass
class DiTTrainingConfig:
    tokenizer: str | None = None             # AdaTok folder to decode sample grids with (optional)
    model: dict = field(default_factory=lambda: {"preset": "dit-tiny"})
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    train: DiTTrainConfig = field(default_factory=DiTTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def build_dit_config(section: dict, meta: dict) -> AdaTokDiTConfig:
    """``{"preset": name, **overrides}`` + the token cache's ``tokens.json`` -> AdaTokDiTConfig."""
    section = dict(section)
    fixed = sorted(set(section) & set(DATA_FIELDS))
    if fixed:
        raise ValueError(f"model.{fixed[0]} comes from the token cache ({', '.join(DATA_FIELDS)}); "
                         "do not set it in the model section")
    data = dict(token_dim=meta["token_dim"], max_tokens=meta["max_tokens"], num_classes=meta["num_classes"],
                length_histograms=meta["length_histograms"], token_mean=meta["token_mean"],
                token_std=meta["token_std"], id2label=dict(enumerate(meta["class_names"])))
    preset = section.pop("preset", None)
    if preset:
        return AdaTokDiTConfig.from_preset(preset, **section, **data)
    return AdaTokDiTConfig(**section, **data)


def batch_generator(device: torch.device, seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The source of one micro-batch's noise, times and class dropout: a pure function of its position."""
    key = ((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + batch
    return torch.Generator(device=device).manual_seed(key % (2**63 - 1))


@torch.no_grad()
def sample_grid(dit: AdaTokDiT, adatok, sc: SampleConfig, path: Path) -> Path:
    """Rows = the first ``sc.max_classes`` classes, ``sc.per_class`` samples each, decoded by ``adatok``."""
    was_training = dit.training
    dit.eval()
    classes = list(range(min(sc.max_classes, dit.config.num_classes)))
    labels = [c for c in classes for _ in range(sc.per_class)]
    g = torch.Generator(dit.device).manual_seed(sc.seed)
    out = ClassToImagePipeline(dit, adatok)(labels, cfg_scale=sc.cfg_scale, num_steps=sc.num_steps, generator=g,
                                            output_type="pt", batch_size=256)
    dit.train(was_training)
    return class_grid(to_uint8(out.images), labels, path, class_names_from_config(dit.config),
                      max_classes=len(classes), max_per_class=sc.per_class)


# =============================================================================================
# the loop
# =============================================================================================
def train(cfg: DiTTrainingConfig) -> dict:
    """Train the DiT on a token cache; returns a summary (steps, wall time, losses, export path)."""
    tc = cfg.train
    configure_threads(tc.num_threads)
    accelerator = make_accelerator(tc.mixed_precision, tc.grad_accum, deepspeed=tc.deepspeed,
                                   micro_batch_size=tc.batch_size, grad_clip=tc.grad_clip)
    ds = uses_deepspeed(accelerator)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out_dir = Path(tc.output_dir)
    cache = TokenCache(cfg.data.tokens, limit=cfg.data.limit)

    torch.manual_seed(tc.seed)                                      # the same init on every rank
    model = AdaTokDiT(build_dit_config(cfg.model, cache.meta))
    assert_replicas_match(accelerator, model, "DiT")
    num_parameters = model.num_parameters()                         # before ZeRO-3 shards the weights
    max_tokens = model.config.max_tokens
    sampler = LengthGroupedBatchSampler(cache.lengths, tc.batch_size, seed=tc.seed, drop_last=True,
                                        mega_batch_mult=cfg.data.mega_batch_mult, rank=rank, world_size=world)
    collate = VarLenCollator(pad_to_multiple_of=cfg.data.pad_to_multiple_of, max_length=max_tokens)
    loader = DataLoader(cache, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    # The EMA copies the whole model before prepare (under ZeRO-3 prepare shards it in place).
    ema = EMA(model, tc.ema_decay, gather=param_gatherer(accelerator)).to(accelerator.device) \
        if tc.ema_decay > 0 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    modules = ({} if ds else {"model": raw_model}) | ({"ema": ema} if ema is not None else {})

    def write_pretrained(folder: Path) -> None:
        raw_model.config.save_pretrained(folder)

    ckpt = CheckpointManager(out_dir, modules, {} if ds else {"optimizer": optimizer}, keep=tc.keep_checkpoints,
                             is_main_process=is_main, engines={"model": model} if ds else None,
                             pretrained={"model": write_pretrained} if ds else None,
                             rank=rank, world_size=world, local_rank=accelerator.local_process_index,
                             barrier=accelerator.wait_for_everyone)

    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "images": 0, "tokens": 0}
    if tc.resume and (tc.resume != "auto" or ckpt.latest() is not None):
        state = ckpt.load(None if tc.resume == "auto" else tc.resume)
        if is_main:
            print(f"resumed from {tc.resume if tc.resume != 'auto' else ckpt.latest()} at step {state['step']}")
    sampler.set_position(state["epoch"], state["batch"])

    adatok = None
    if cfg.tokenizer and is_main and tc.sample_every:
        from ..tokenizer import AdaTokModel

        adatok = AdaTokModel.from_pretrained(cfg.tokenizer).to(accelerator.device).eval()
        ClassToImagePipeline(raw_model, adatok)                     # token_dim / max_tokens must fit: fail now
        if model_fingerprint(cfg.tokenizer) != cache.meta.get("tokenizer_fingerprint"):
            warnings.warn(f"--tokenizer {cfg.tokenizer} is not the tokenizer that made the token cache "
                          f"({cache.meta.get('tokenizer')}): the sample grids will decode with other weights")

    global_batch = tc.batch_size * tc.grad_accum * world
    logger = RunLogger(out_dir, enabled=is_main)
    if is_main:
        pad = padding_fraction(sampler.global_batches(0), cache.lengths, cfg.data.pad_to_multiple_of)
        print(f"DiT over AdaTok tokens: {num_parameters / 1e6:.2f}M parameters, {len(cache)} images "
              f"({cache.meta['num_classes']} classes, mean length {float(cache.lengths.float().mean()):.2f} of "
              f"{max_tokens}, token_dim {raw_model.config.token_dim}), "
              f"{describe_batch(tc.batch_size, tc.grad_accum, world)}, "
              f"padding {pad:.1%}, device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
              + (f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if ds else ""))

    def save(step: int) -> Path | None:   # with several processes ckpt.save fences itself with barriers
        return ckpt.save(step, state)

    sampling = bool(cfg.tokenizer and tc.sample_every)             # the same on every rank

    def write_samples(step: int) -> None:
        if not sampling:
            return
        dit = ema.shadow if ema is not None else materialize(accelerator, model)   # a collective under ZeRO-3
        if adatok is not None:
            sample_grid(dit, adatok, cfg.sample, out_dir / "samples" / f"step-{step:08d}.png")
        accelerator.wait_for_everyone()

    bar = tqdm(total=tc.max_steps, initial=state["step"], disable=not is_main, desc="DiT (flow matching)",
               dynamic_ncols=True)
    started = time.time() - state["elapsed_s"]
    last_log_time, last_log_images = time.time(), state["images"]
    last_sampled = -1
    model.train()
    done = state["step"] >= tc.max_steps
    while not done:
        for batch in loader:
            step = state["step"]
            tokens = batch["tokens"].to(accelerator.device, non_blocking=True)         # [B, Lb, D]
            lengths = batch["lengths"].to(accelerator.device)                          # [B]
            labels = batch["labels"].to(accelerator.device)                            # [B]
            elapsed = time.time() - started
            progress = run_progress(step, elapsed, tc.max_steps, tc.time_budget_s)
            lr = lr_at(progress, step, tc.lr, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
            set_lr(optimizer, lr)
            g = batch_generator(accelerator.device, tc.seed, rank, state["epoch"], state["batch"])
            with accelerator.accumulate(model), half_precision_autocast(accelerator):
                x0 = raw_model.normalize_tokens(tokens, lengths)
                out = flow_matching_loss(model, x0, lengths, labels, null_class=raw_model.null_class,
                                         class_dropout_prob=raw_model.config.class_dropout_prob,
                                         time_distribution=tc.time_distribution, logit_mean=tc.logit_mean,
                                         logit_std=tc.logit_std, generator=g)
                stop_if_non_finite(accelerator, {"loss": out.loss}, step, save, close=(bar, logger))
                grad_norm = optimizer_step(accelerator, out.loss, optimizer, params, tc.grad_clip)
            state["batch"] += 1
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.update(raw_model)
            state["step"] = step = step + 1
            state["images"] += global_batch
            state["tokens"] += int(lengths.sum()) * world
            state["elapsed_s"] = elapsed = time.time() - started
            bar.update(1)
            if step % tc.log_every == 0 or step == 1:
                now = time.time()
                ips = (state["images"] - last_log_images) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_images = now, state["images"]
                values = mean_over_ranks(accelerator, {"loss": float(out.loss.detach())})
                values.update({"lr": lr, "images_per_s": ips,
                               "mean_length": float(lengths.float().mean()), "padded_length": int(tokens.shape[1])})
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                logger.log(step, values)
                postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}", "img/s": f"{ips:.0f}"}
                if tc.time_budget_s:
                    postfix["left"] = f"{max(0.0, tc.time_budget_s - elapsed):.0f}s"
                bar.set_postfix(postfix)
            if sampling and step % tc.sample_every == 0:
                write_samples(step)
                last_sampled = step
            if tc.save_every and step % tc.save_every == 0:
                save(step)
            if step >= tc.max_steps or (tc.time_budget_s and elapsed >= tc.time_budget_s):
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch"] = 0
            sampler.set_position(state["epoch"], 0)
    bar.close()
    final_ckpt = save(state["step"])
    if sampling and last_sampled != state["step"]:
        write_samples(state["step"])
    summary = {"steps": state["step"], "wall_s": state["elapsed_s"],
               "images_per_s": state["images"] / max(state["elapsed_s"], 1e-9),
               "num_parameters": num_parameters, "checkpoint": str(final_ckpt) if final_ckpt else None}
    export_model = None
    if tc.export:
        export_model = ema.shadow if ema is not None else final_model(accelerator, model, final_ckpt)   # collective
    if tc.export and is_main:
        export_dir = out_dir / "model"
        export_model.save_pretrained(export_dir)
        provenance = {k: cache.meta.get(k) for k in ("tokenizer", "tokenizer_fingerprint", "num_tokens",
                                                      "num_items", "mean_length", "class_names")}
        (export_dir / "token_cache.json").write_text(json.dumps(dict(provenance, path=str(Path(cfg.data.tokens)
                                                                                       .resolve())), indent=1),
                                                     encoding="utf-8")
        summary["model_dir"] = str(export_dir)
        logger.log(state["step"], {"event": "export", **{k: v for k, v in summary.items() if k != "checkpoint"}})
    accelerator.wait_for_everyone()
    logger.close()
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(DiTTrainingConfig, argv)
    summary = train(cfg)
    if summary.get("model_dir"):
        print(f"exported DiT: {summary['model_dir']}")
    return summary


if __name__ == "__main__":
    main()
