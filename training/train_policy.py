"""Stage 2: train the Adaptive Token Allocation policy with REINFORCE (paper Sec. 4.2, eq. 6-9).

    python -m adatok_vlm.training.train_policy --config configs/policy/adatok-tiny.yaml \
        --tokenizer outputs/demo/model --output_dir outputs/policy

The stage-1 tokenizer is frozen. Per batch: one encoder pass gives the policy's features; a length
``L ~ pi(L | f)`` is sampled per image; the reconstruction from ``L`` tokens gives the reward
(continuous eq. 6 or structured eq. 7); a second decode at the policy's rounded mean length gives
the baseline ``R(L_mean)``; the advantage is eq. 8 and the loss eq. 9 with a decaying entropy bonus.
The same run fits the quality head (rl(L) curves) on the losses it measured, for the quality/budget
dial. The exported model answers ``encode(x, num_tokens="auto")``.

With ``train.reward_table true`` the decodes happen once, up front: every image's loss at every
allowed length is measured and cached, and each step looks its rewards up (see ``reward_table``);
``train.objective expected`` then follows the exact gradient of the expected reward, and
``train.val_size`` scores the policy on held-out images against the best fixed length, the binary
search and the oracle at every log step (``policy_val_reward.png``).

Under DeepSpeed (``--train.deepspeed zero2``/``zero3`` or a DeepSpeed ``accelerate launch``) only
the trainable heads (policy + quality head) form the engine; the frozen tokenizer stays a plain
replica on every rank, so the variable-length decodes it runs (``L`` differs per rank) are local and
the sharded heads are called the same number of times on every rank each step. Logged values are
averaged over ranks; the export consolidates the heads (a collective) and rank 0 writes the model.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tokenizer import AdaTokModel
from ..tokenizer.policy import lengths_to_indices
from ..tokenizer.rewards import entropy_weight, reinforce_loss, relative_advantage
from .batches import PreloadedImages, ResumableBatchSampler
from .checkpointing import CheckpointManager
from .config import parse_config
from .distributed import (assert_replicas_match, describe_batch, fill_bucket_sizes, final_model, full_state_dict,
                          half_precision_autocast, half_precision_engine, mean_over_ranks, stop_if_non_finite,
                          uses_deepspeed, zero_stage)
from .engine import RunLogger, configure_threads, lr_at, optimizer_step, run_progress, set_lr
from .launch import make_accelerator
from .evaluation import mse_per_image
from .reward_table import (OBJECTIVES, calibrate_dial, measure_shared, score_on_table, table_policy_loss,
                           table_rewards)
from .train_tokenizer import DataConfig, build_image_processor, build_train_data

HISTORY_KEYS = ("reward", "entropy", "log_prob", "length_mean", "val_reward", "val_best_fixed_reward",
                "val_search_reward", "val_oracle_reward")
POLICY_FIELDS = ("policy_min_tokens", "policy_max_tokens", "policy_step", "policy_hidden_size", "policy_num_layers",
                 "policy_dropout", "reward_kind", "reward_alpha", "reward_beta", "reward_gamma", "reward_rl_base",
                 "search_threshold")


@dataclass
class PolicyTrainConfig:
    output_dir: str = "outputs/policy"
    seed: int = 0
    max_steps: int = 1000
    time_budget_s: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 4e-5
    grad_clip: float = 1.0
    advantage: str = "relative"              # eq. 8 ("relative") or the plain baseline ("baseline")
    mu: float = 0.1                          # eq. 8
    entropy_start: float = 0.05              # lambda(0) of eq. 9
    entropy_end: float = 0.0
    entropy_schedule: str = "linear"         # linear | cosine | exponential | constant
    curve_weight: float = 1.0                # weight of the quality-head regression (the dial)
    curve_extra_lengths: int = 1             # extra random lengths decoded per image for the curve fit (online)
    reward_table: bool = False               # measure rl at every grid length once, then train on look-ups
    table_size: int | None = None            # training images in the table (None: all of data.limit)
    objective: str = "reinforce"             # reinforce (eq. 8/9) | expected (exact gradient; table only)
    val_size: int = 0                        # held-out training images scored every log step (table mode)
    dial_confidence: float = 0.9             # share of held-out (image, length) pairs the max_mse dial covers
    mixed_precision: str = "auto"
    num_threads: int | None = None
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    export: bool = True
    deepspeed: str | None = None             # DeepSpeed JSON (configs/deepspeed/zero2.json) or its name ("zero3")


@dataclass
class PolicyTrainingConfig:
    tokenizer: str = "outputs/demo/model"    # the stage-1 model folder (save_pretrained)
    model: dict = field(default_factory=dict)  # policy_* / reward_* / search_threshold overrides
    data: DataConfig = field(default_factory=DataConfig)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)


def load_tokenizer_for_policy(path: str, overrides: dict) -> AdaTokModel:
    """Load the stage-1 model, apply policy/reward overrides and attach a fresh policy (unless resuming one)."""
    unknown = sorted(set(overrides) - set(POLICY_FIELDS))
    if unknown:
        raise ValueError(f"stage 2 can only override {POLICY_FIELDS} of the tokenizer config, got {unknown}")
    model = AdaTokModel.from_pretrained(path)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    model.config.__post_init__()   # re-validate the changed fields
    model.requires_grad_(False)
    model.enable_policy()
    return model


def train(cfg: PolicyTrainingConfig) -> dict:
    tc = cfg.train
    configure_threads(tc.num_threads)
    accelerator = make_accelerator(tc.mixed_precision, deepspeed=tc.deepspeed, micro_batch_size=tc.batch_size,
                                   grad_clip=tc.grad_clip)
    is_main = accelerator.is_main_process
    ds = uses_deepspeed(accelerator)
    out_dir = Path(tc.output_dir)
    torch.manual_seed(tc.seed)
    model = load_tokenizer_for_policy(cfg.tokenizer, cfg.model).to(accelerator.device).eval()
    assert_replicas_match(accelerator, model, "tokenizer with its fresh policy")
    torch.manual_seed(tc.seed + 1000 * accelerator.process_index)
    policy, curve_head = model.policy, model.quality_head
    grid = policy.grid
    m = model.num_latent_tokens
    spec = model.reward_spec()

    if tc.objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {tc.objective!r}")
    if tc.objective == "expected" and not tc.reward_table:
        raise ValueError("train.objective 'expected' sums the reward over every length: it needs "
                         "train.reward_table true")
    if tc.val_size and not tc.reward_table:
        raise ValueError("train.val_size scores the policy on a held-out reward table: it needs "
                         "train.reward_table true")
    if not 0.0 < tc.dial_confidence < 1.0:
        raise ValueError(f"train.dial_confidence must be in (0, 1), got {tc.dial_confidence}")
    data, collate = build_train_data(_as_tokenizer_cfg(cfg), model.config)
    table, val_table, table_s = (_reward_tables(cfg, model, data, collate, accelerator) if tc.reward_table
                                 else (None, None, 0.0))
    if table is not None:
        train_rewards = table_rewards(spec, table, grid, m)
        val_rewards = table_rewards(spec, val_table, grid, m) if val_table is not None else None
    sampler = ResumableBatchSampler(len(table) if table is not None else len(data), tc.batch_size, seed=tc.seed,
                                    rank=accelerator.process_index, world_size=accelerator.num_processes)
    heads = torch.nn.ModuleDict({"policy": policy, "quality_head": curve_head})
    params = [p for p in heads.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    fill_bucket_sizes(accelerator, model.config.policy_hidden_size)   # the heads have no config.hidden_size
    heads, optimizer = accelerator.prepare(heads, optimizer)
    raw_heads = accelerator.unwrap_model(heads)

    def write_pretrained(folder: Path) -> None:
        model.config.save_pretrained(folder)
        build_image_processor(model.config, cfg.data, train=False).save_pretrained(folder)
        # ``adatok export`` takes the frozen weights from here and the heads from the ZeRO shards.
        (folder / "export.json").write_text(json.dumps({"base_model": str(Path(cfg.tokenizer).resolve())}),
                                            encoding="utf-8")

    ckpt = CheckpointManager(out_dir, {} if ds else {"heads": raw_heads}, {} if ds else {"optimizer": optimizer},
                             keep=tc.keep_checkpoints, is_main_process=is_main,
                             engines={"heads": heads} if ds else None,
                             pretrained={"heads": write_pretrained} if ds else None,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             local_rank=accelerator.local_process_index,
                             barrier=accelerator.wait_for_everyone)
    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "history": []}
    if tc.resume and (tc.resume != "auto" or ckpt.latest() is not None):
        state = ckpt.load(None if tc.resume == "auto" else tc.resume)
    sampler.set_position(state["epoch"], state["batch"])
    logger = RunLogger(out_dir, enabled=is_main)
    if is_main:
        objective = f"{tc.advantage} advantage (mu={tc.mu})" if tc.objective == "reinforce" else "exact expected reward"
        source = "online decodes"
        if table is not None:
            source = (f"reward table of {len(table)} images x {grid.numel()} lengths "
                      + (f"(measured in {table_s:.0f} s)" if table_s else "(from disk)"))
        print(f"AdaTok stage 2 (ATA): lengths {int(grid[0])}..{int(grid[-1])} ({grid.numel()} choices), "
              f"{spec.kind} reward, {objective}, {source}, "
              f"{describe_batch(tc.batch_size, 1, accelerator.num_processes)}, {num_trainable / 1e3:.1f}K trainable"
              + (f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if ds else ""))

    bar = tqdm(total=tc.max_steps, initial=state["step"], disable=not is_main, desc="stage 2 (ATA)", dynamic_ncols=True)
    started = time.time() - state["elapsed_s"]
    done = False
    heads.train()
    while not done:
        if table is not None:
            iterator = iter(sampler)
        elif isinstance(data, PreloadedImages):
            iterator = (data.batch(ix) for ix in sampler)
        else:
            iterator = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)
        for batch in iterator:
            step = state["step"]
            elapsed = time.time() - started
            progress = run_progress(step, elapsed, tc.max_steps, tc.time_budget_s)
            lr = lr_at(progress, step, tc.lr, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
            set_lr(optimizer, lr)
            lam = entropy_weight(step, tc.max_steps, tc.entropy_start, tc.entropy_end, tc.entropy_schedule)
            if table is not None:
                rows = torch.as_tensor(batch)
                features = table.features[rows].to(accelerator.device)
                measured_rl = table.rl[rows].to(accelerator.device)
                with half_precision_autocast(accelerator):
                    rewards = train_rewards[rows].to(features.device)
                    pg_loss, pg_logs, drawn = table_policy_loss(policy, features, rewards, tc.objective, tc.mu,
                                                                tc.advantage, lam)
                    curve_loss = curve_head.curve_loss(features, grid.expand(rows.numel(), -1), measured_rl)
                lengths, log_prob, entropy = drawn["lengths"], drawn["log_prob"], drawn["entropy"]
                reward, baseline = drawn["reward"], drawn["baseline"]
                rl = measured_rl.gather(1, lengths_to_indices(lengths, grid)[:, None]).squeeze(1)
            else:
                x = batch["pixel_values"].to(accelerator.device)
                pg_loss, pg_logs, curve_loss, lengths, log_prob, entropy, reward, baseline, rl = _online_step(
                    model, policy, curve_head, x, spec, m, tc, lam, accelerator)
            loss = pg_loss + tc.curve_weight * curve_loss
            checks = {"loss": loss, "reward": reward.mean(), "log_prob": log_prob.mean(), "curve_loss": curve_loss}
            stop_if_non_finite(accelerator, checks, step, lambda at: ckpt.save(at, state))
            optimizer_step(accelerator, loss, optimizer, params, tc.grad_clip)

            state["batch"] += 1
            state["step"] = step = step + 1
            state["elapsed_s"] = elapsed = time.time() - started
            bar.update(1)
            record = {"loss": float(loss.detach()), "reward": float(reward.mean()),
                      "baseline_reward": float(baseline.mean()), "entropy": float(entropy.mean().detach()),
                      "log_prob": float(log_prob.mean().detach()), "entropy_weight": lam,
                      "length_mean": float(lengths.float().mean()), "length_std": float(lengths.float().std()),
                      "rl": float(rl.mean()), "curve_loss": float(curve_loss.detach()), "lr": lr}
            record = mean_over_ranks(accelerator, record)   # the global batch's values (a collective)
            logging = step % tc.log_every == 0 or step == 1
            if logging and val_table is not None:          # every rank: a policy forward (collective under ZeRO-3)
                heads.eval()
                record.update(score_on_table(policy, val_table, val_rewards, model.config.search_threshold))
                heads.train()
            state["history"].append({k: v for k, v in record.items() if k in HISTORY_KEYS} | {"step": step})
            _warn_on_collapse(state["history"], tc.max_steps, is_main)
            if logging:
                logger.log(step, record | pg_logs)
                bar.set_postfix(reward=f"{record['reward']:.3f}", L=f"{record['length_mean']:.1f}",
                                H=f"{record['entropy']:.2f}")
            if tc.save_every and step % tc.save_every == 0:
                ckpt.save(step, state)
            if step >= tc.max_steps or (tc.time_budget_s and elapsed >= tc.time_budget_s):
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch"] = 0
            sampler.set_position(state["epoch"], 0)
    bar.close()
    if val_table is not None:
        heads.eval()
        model.config.quality_margin = calibrate_dial(curve_head, val_table, tc.dial_confidence)
        if is_main:
            print(f"quality dial: margin {model.config.quality_margin:.3f} (log space) covers "
                  f"{tc.dial_confidence:.0%} of {len(val_table)} held-out images' measured losses")
    final = ckpt.save(state["step"], state)
    summary = {"steps": state["step"], "wall_s": state["elapsed_s"], "checkpoint": str(final) if final else None,
               "reward_table_s": table_s}
    # The heads' whole weights: the fp32 master copies of a half-precision engine (from the final
    # checkpoint, on the main process), else the live ones (gathered: a collective under ZeRO-3).
    export_model, heads_state = None, None
    if tc.export and half_precision_engine(accelerator):
        export_model = final_model(accelerator, heads, final, tag="heads")
    elif tc.export and ds:
        heads_state = full_state_dict(accelerator, heads)
    if is_main:
        from .visualize import training_curves

        training_curves(state["history"], out_dir)
        if tc.export:
            export_dir = out_dir / "model"
            if export_model is not None:
                export_model.save_pretrained(export_dir)
            elif heads_state is not None:   # whole heads over the (possibly sharded) ones
                model.save_pretrained(export_dir, state_dict={**model.state_dict(), **heads_state})
            else:
                model.save_pretrained(export_dir)
            build_image_processor(model.config, cfg.data, train=False).save_pretrained(export_dir)
            summary["model_dir"] = str(export_dir)
    accelerator.wait_for_everyone()
    logger.close()
    return summary


def _online_step(model, policy, curve_head, x, spec, m, tc, lam, accelerator):
    """The paper's step: sample L per image, decode at L and at the rounded mean length (the
    baseline of eq. 8), plus ``curve_extra_lengths`` random lengths for the quality head."""
    grid = policy.grid
    with torch.no_grad():
        tokens, hidden, _, _ = model.forward_encoder(x)
        features = model.policy_features(hidden)
    with half_precision_autocast(accelerator):   # heads in bf16 under a DeepSpeed bf16 engine
        lengths, log_prob, entropy = policy.sample(features)
        mean_lengths = policy.rounded_expected_length(features)
    with torch.no_grad():
        rl = mse_per_image(model.decode(tokens[:, : int(lengths.max())], lengths), x)
        rl_mean = mse_per_image(model.decode(tokens[:, : int(mean_lengths.max())], mean_lengths), x)
        measured_l, measured_rl = [lengths, mean_lengths], [rl, rl_mean]
        for _ in range(tc.curve_extra_lengths):
            extra = grid[torch.randint(0, grid.numel(), (x.shape[0],), device=grid.device)]
            measured_l.append(extra)
            measured_rl.append(mse_per_image(model.decode(tokens[:, : int(extra.max())], extra), x))
    reward = spec(rl, lengths, m)
    baseline = spec(rl_mean, mean_lengths, m)
    advantage = relative_advantage(reward, baseline, tc.mu, tc.advantage)
    pg_loss, pg_logs = reinforce_loss(log_prob, advantage, entropy, lam)
    with half_precision_autocast(accelerator):
        curve_loss = curve_head.curve_loss(features, torch.stack(measured_l, 1), torch.stack(measured_rl, 1))
    return pg_loss, pg_logs, curve_loss, lengths, log_prob, entropy, reward, baseline, rl


def _reward_tables(cfg: PolicyTrainingConfig, model: AdaTokModel, data, collate, accelerator):
    """The training table (the first ``train.table_size`` images of the training data) and, with
    ``train.val_size``, a held-out one (the last ``val_size`` images, never in the table); both cached
    under ``<output_dir>/reward_table``. Returns ``(table, val_table or None, seconds spent measuring)``."""
    from ..generator.sample_c2i import model_fingerprint

    tc, grid = cfg.train, model.policy.grid
    folder = Path(tc.output_dir) / "reward_table"
    if cfg.data.flip:
        warnings.warn("train.reward_table measures each image once, without data.flip augmentation")
    total = len(data)
    num_rows = min(tc.table_size or total, total - tc.val_size)
    if tc.val_size < 0 or num_rows < 1:
        raise ValueError(f"the training data has {total} images: too few for train.val_size={tc.val_size} held-out "
                         "images plus a reward table")
    meta = {"tokenizer": model_fingerprint(cfg.tokenizer), "grid": grid.tolist(), "rows": [0, num_rows],
            "data": dataclasses.asdict(cfg.data)}

    def load(ix: list[int]) -> torch.Tensor:
        if isinstance(data, PreloadedImages):
            return data.batch(ix)["pixel_values"]
        return collate([data[i] for i in ix])["pixel_values"]

    batch = max(tc.batch_size, 64)
    table, seconds = measure_shared(accelerator, folder / "train.safetensors", meta, model, load, num_rows, batch,
                                    grid, "reward table (train)")
    val_table = None
    if tc.val_size:
        first = total - tc.val_size
        val_table, val_s = measure_shared(accelerator, folder / "val.safetensors", dict(meta, rows=[first, total]),
                                          model, lambda ix: load([first + i for i in ix]), tc.val_size, batch, grid,
                                          "reward table (held out)")
        seconds += val_s
    return table, val_table, seconds


def _warn_on_collapse(history: list[dict], max_steps: int, is_main: bool) -> None:
    """Warn once if the policy's entropy collapses (~0) within the first 10% of training."""
    step = history[-1]["step"]
    if is_main and step == max(1, max_steps // 10) and history[-1]["entropy"] < 0.05:
        warnings.warn(f"the length policy's entropy is {history[-1]['entropy']:.3f} after {step} steps "
                      "(10% of training): it has collapsed early; raise train.entropy_start or lower train.lr")


def _as_tokenizer_cfg(cfg: PolicyTrainingConfig):
    """Adapter so the stage-1 data builder serves stage 2 (same data section, same seed)."""
    from .train_tokenizer import TokenizerTrainingConfig, TrainConfig

    return TokenizerTrainingConfig(data=cfg.data, train=TrainConfig(seed=cfg.train.seed))


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(PolicyTrainingConfig, argv)
    summary = train(cfg)
    if summary.get("model_dir"):
        print(f"exported model with policy: {summary['model_dir']}")
    return summary


if __name__ == "__main__":
    main()
