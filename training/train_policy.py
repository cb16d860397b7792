"""Stage 2: train the Adaptive Token Allocation policy with REINFORCE (paper Sec. 4.2, eq. 6-9).

    python -m adatok_vlm.training.train_policy --config configs/policy/adatok-tiny.yaml \
        --tokenizer outputs/demo/model --output_dir outputs/policy

The stage-1 tokenizer is frozen. Per batch: one encoder pass gives the policy's features; a length
``L ~ pi(L | f)`` is sampled per image; the reconstruction from ``L`` tokens gives the reward
(continuous eq. 6 or structured eq. 7); a second decode at the policy's rounded mean length gives
the baseline ``R(L_mean)``; the advantage is eq. 8 and the loss eq. 9 with a decaying entropy bonus.
The same run fits the quality head (rl(L) curves) on the losses it measured, for the quality/budget
dial. The exported model answers ``encode(x, num_tokens="auto")``. Online, the images may come from a
stream (webdataset tar shards, ``data.streaming: true``), read as stage 1 reads one
(``data_setup.StreamEpochs``: each rank its part, by ``train.max_steps``, resumed at the same batch).

With ``train.reward_table true`` the decodes happen once, up front: every image's loss at every
allowed length is measured and cached, and each step looks its rewards up (see ``reward_table``);
``train.objective expected`` then follows the exact gradient of the expected reward, and
``train.val_size`` scores the policy on held-out images against the best fixed length, the binary
search and the oracle at every log step (``policy_val_reward.png``). At scale the table is a seeded
subset (``train.table_size`` + ``train.val_size`` images drawn by ``train.table_seed``) measured through
the evaluation transform on a coarse grid (``model.policy_step``), in chunks across ranks that an
interrupted run resumes (``train.table_chunk_size``).

Under DeepSpeed (``--train.deepspeed zero2``/``zero3`` or a DeepSpeed ``accelerate launch``) only
the trainable heads (policy + quality head) form the engine; the frozen tokenizer stays a plain
replica on every rank, so the variable-length decodes it runs (``L`` differs per rank) are local and
the sharded heads are called the same number of times on every rank each step. Logged values are
averaged over ranks; the export consolidates the heads (a collective) and rank 0 writes the model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tokenizer import AdaTokModel
from ..tokenizer.policy import lengths_to_indices
from ..tokenizer.rewards import (BASELINE_READINGS, baseline_lengths, entropy_weight, pool_baseline, reinforce_loss,
                                 relative_advantage)
from .batches import PreloadedImages, ResumableBatchSampler
from .data_setup import (DataConfig, StreamData, StreamEpochs, build_image_processor, build_train_data, epoch_batches,
                         load_bounded_split, resolve_num_workers, train_data_from)
from .distributed import assert_replicas_match, fill_bucket_sizes, half_precision_autocast, mean_over_ranks
from .evaluation import mse_per_image
from .loop import LoopConfig, Stage, main as run_main, rank_seed, run
from .reward_table import (OBJECTIVES, calibrate_dial, measure_shared, score_on_table, table_policy_loss,
                           table_rewards)

HISTORY_KEYS = ("reward", "entropy", "log_prob", "length_mean", "val_reward", "val_best_fixed_reward",
                "val_search_reward", "val_oracle_reward")
POLICY_FIELDS = ("policy_min_tokens", "policy_max_tokens", "policy_step", "policy_hidden_size", "policy_num_layers",
                 "policy_dropout", "policy_image_statistics", "policy_token_features", "reward_kind", "reward_alpha",
                 "reward_beta", "reward_gamma", "reward_rl_base", "search_threshold")


@dataclass
class PolicyTrainConfig(LoopConfig):
    output_dir: str = "outputs/policy"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 4e-5
    advantage: str = "relative"              # eq. 8 ("relative") or the plain baseline ("baseline")
    mu: float = 0.1                          # eq. 8
    baseline_reading: str = "image"          # where eq. 8's R(L_mean) is measured: image | batch_length | batch_reward
    entropy_start: float = 0.05              # lambda(0) of eq. 9
    entropy_end: float = 0.0
    entropy_schedule: str = "linear"         # linear | cosine | exponential | constant
    curve_weight: float = 1.0                # weight of the quality-head regression (the dial)
    curve_extra_lengths: int = 1             # extra random lengths decoded per image for the curve fit (online)
    reward_table: bool = False               # measure rl at every grid length once, then train on look-ups
    table_size: int | None = None            # training images in the table (None: all of data.limit)
    table_seed: int | None = None            # the seeded draw of the table's + held-out images (None: train.seed)
    table_chunk_size: int = 2048             # rows per saved part of a table being measured (resume granularity)
    objective: str = "reinforce"             # reinforce (eq. 8/9) | expected (exact gradient; table only)
    ce_warm_steps: int = 0                   # first steps on cross-entropy to softmax(R / ce_tau) (table only)
    ce_tau: float = 0.1
    val_size: int = 0                        # held-out training images scored every log step (table mode)
    dial_confidence: float = 0.9             # share of held-out (image, length) pairs the max_mse dial covers

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "expected" and not self.reward_table:
            raise ValueError("train.objective 'expected' sums the reward over every length: it needs "
                             "train.reward_table true")
        if self.ce_warm_steps and not self.reward_table:
            raise ValueError("train.ce_warm_steps fits the policy to softmax(R / ce_tau) over every length: it needs "
                             "train.reward_table true")
        if self.ce_warm_steps < 0 or self.ce_tau <= 0:
            raise ValueError(f"train.ce_warm_steps must be >= 0 and train.ce_tau > 0, got {self.ce_warm_steps}, "
                             f"{self.ce_tau}")
        if self.val_size and not self.reward_table:
            raise ValueError("train.val_size scores the policy on a held-out reward table: it needs "
                             "train.reward_table true")
        if self.baseline_reading not in BASELINE_READINGS:
            raise ValueError(f"train.baseline_reading must be one of {BASELINE_READINGS}, got {self.baseline_reading!r}")
        if self.table_chunk_size < 1:
            raise ValueError(f"train.table_chunk_size must be >= 1, got {self.table_chunk_size}")
        if not 0.0 < self.dial_confidence < 1.0:
            raise ValueError(f"train.dial_confidence must be in (0, 1), got {self.dial_confidence}")


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


class PolicyStage(Stage):
    """Stage 2 for :func:`~.loop.run`: REINFORCE (or the exact expected reward) over online decodes or a
    reward table. The trained model is the heads (policy + quality head) inside the frozen tokenizer."""

    desc = "stage 2 (ATA)"
    tag = "heads"
    count = None
    autocast = False        # the step picks what runs in half precision (the frozen decodes stay fp32)
    postfix_keys = ("reward", "length_mean", "entropy")
    log_export = False      # log.jsonl keeps one row per step

    def __init__(self, cfg: PolicyTrainingConfig, accelerator):
        tc, self.cfg, self.accelerator = cfg.train, cfg, accelerator
        model = load_tokenizer_for_policy(cfg.tokenizer, cfg.model).to(accelerator.device).eval()
        assert_replicas_match(accelerator, model, "tokenizer with its fresh policy")
        rank_seed(accelerator, tc.seed)
        self.whole, self.grid, self.spec = model, model.policy.grid, model.reward_spec()
        self.table, self.val_table, self.table_s = (_reward_tables(cfg, model, accelerator)
                                                    if tc.reward_table else (None, None, 0.0))
        data, collate = (build_train_data(cfg, model.config, allow_stream=True) if self.table is None
                         else (None, None))
        self.data = data
        m = model.num_latent_tokens
        if self.table is not None:
            self.train_rewards = table_rewards(self.spec, self.table, self.grid, m)
            self.val_rewards = table_rewards(self.spec, self.val_table, self.grid, m) \
                if self.val_table is not None else None
        # The batches: table rows, or images of a map-style set, or of a stream (read as stage 1 reads one)
        self.sliced = isinstance(data, PreloadedImages) and resolve_num_workers(data, cfg.data.num_workers) == 0
        if isinstance(data, StreamData):
            self.sampler = StreamEpochs.for_run(data, cfg, accelerator)
            self.batches = self.sampler.stream
        else:
            self.sampler = ResumableBatchSampler(len(self.table) if self.table is not None else len(data),
                                                 tc.batch_size, seed=tc.seed, rank=accelerator.process_index,
                                                 world_size=accelerator.num_processes)
            self.batches = (lambda: iter(self.sampler)) if self.table is not None else \
                epoch_batches(data, collate, self.sampler, cfg.data.num_workers)
        heads = torch.nn.ModuleDict({"policy": model.policy, "quality_head": model.quality_head})
        self.params = [p for p in heads.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)
        optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        fill_bucket_sizes(accelerator, model.config.policy_hidden_size)   # the heads have no config.hidden_size
        self.model, self.optimizer = accelerator.prepare(heads, optimizer)

    def counters(self) -> dict:
        return {"history": [], "skipped_images": 0}

    def write_pretrained(self, folder: Path) -> None:
        self.whole.config.save_pretrained(folder)
        build_image_processor(self.whole.config, self.cfg.data, train=False).save_pretrained(folder)
        # ``adatok export`` takes the frozen weights from here and the heads from the ZeRO shards.
        (folder / "export.json").write_text(json.dumps({"base_model": str(Path(self.cfg.tokenizer).resolve())}),
                                            encoding="utf-8")

    def banner(self) -> str:
        tc, grid = self.cfg.train, self.grid
        mu = f"mu={tc.mu}, " if tc.advantage == "relative" else ""
        objective = (f"{tc.advantage} advantage ({mu}R(L_mean) per {tc.baseline_reading})"
                     if tc.objective == "reinforce" else "exact expected reward")
        source = "online decodes" + (f" of {self.data.describe()}" if isinstance(self.data, StreamData) else "")
        if self.table is not None:
            source = (f"reward table of {len(self.table)} images x {grid.numel()} lengths "
                      + (f"(measured in {self.table_s:.0f} s)" if self.table_s else "(from disk)"))
        return (f"AdaTok stage 2 (ATA): lengths {int(grid[0])}..{int(grid[-1])} ({grid.numel()} choices), "
                f"{self.spec.kind} reward, {objective}, {source}, {self.num_trainable / 1e3:.1f}K trainable")

    def prepare(self, batch, state: dict):
        """Online images decoded per item (a stream, a set not preloaded): count the unreadable ones dropped
        from the batch, and skip a batch left empty here or on another rank (a collective, as in stage 1)."""
        if self.table is not None or self.sliced:
            return batch
        return None if self.drop_unreadable(batch, state) else batch

    def step(self, batch, state: dict) -> dict:
        tc, acc, model = self.cfg.train, self.accelerator, self.whole
        policy, curve_head, grid = model.policy, model.quality_head, self.grid
        lam = entropy_weight(state["step"], tc.max_steps, tc.entropy_start, tc.entropy_end, tc.entropy_schedule)
        if self.table is not None:
            rows = torch.as_tensor(batch)
            features = self.table.features[rows].to(acc.device)
            measured_rl = self.table.rl[rows].to(acc.device)
            with half_precision_autocast(acc):
                rewards = self.train_rewards[rows].to(features.device)
                warm = tc.ce_tau if state["step"] < tc.ce_warm_steps else None
                pg_loss, pg_logs, drawn = table_policy_loss(policy, features, rewards, tc.objective, tc.mu,
                                                            tc.advantage, lam, tc.baseline_reading, ce_tau=warm)
                curve_loss = curve_head.curve_loss(features, grid.expand(rows.numel(), -1), measured_rl)
            lengths, log_prob, entropy = drawn["lengths"], drawn["log_prob"], drawn["entropy"]
            reward, baseline = drawn["reward"], drawn["baseline"]
            rl = measured_rl.gather(1, lengths_to_indices(lengths, grid)[:, None]).squeeze(1)
        else:
            x = batch["pixel_values"].to(acc.device)
            pg_loss, pg_logs, curve_loss, lengths, log_prob, entropy, reward, baseline, rl = _online_step(
                model, policy, curve_head, x, self.spec, model.num_latent_tokens, tc, lam, acc)
        loss = pg_loss + tc.curve_weight * curve_loss
        self.pg_logs = pg_logs
        self.record = {"loss": float(loss.detach()), "reward": float(reward.mean()),
                       "baseline_reward": float(baseline.mean()), "entropy": float(entropy.mean().detach()),
                       "log_prob": float(log_prob.mean().detach()), "entropy_weight": lam,
                       "length_mean": float(lengths.float().mean()), "length_std": float(lengths.float().std()),
                       "rl": float(rl.mean()), "curve_loss": float(curve_loss.detach())}
        return {"loss": loss, "reward": reward.mean(), "log_prob": log_prob.mean(), "curve_loss": curve_loss}

    def on_step_end(self, state: dict, log: bool) -> dict | None:
        record = mean_over_ranks(self.accelerator, self.record)   # the global batch's values (a collective)
        if log and self.val_table is not None:                  # every rank: a policy forward (collective under ZeRO-3)
            self.model.eval()
            record.update(score_on_table(self.whole.policy, self.val_table, self.val_rewards,
                                         self.whole.config.search_threshold))
            self.model.train()
        state["history"].append({k: v for k, v in record.items() if k in HISTORY_KEYS} | {"step": state["step"]})
        _warn_on_collapse(state["history"], self.cfg.train.max_steps, self.accelerator.is_main_process)
        return record | self.pg_logs if log else None

    def on_train_end(self, state: dict) -> None:
        out_dir = Path(self.cfg.train.output_dir)
        if self.val_table is not None:
            self.model.eval()
            config = self.whole.config
            config.quality_margin = calibrate_dial(self.whole.quality_head, self.val_table, self.cfg.train.dial_confidence)
            if self.accelerator.is_main_process:
                print(f"quality dial: margin {config.quality_margin:.3f} (log space) covers "
                      f"{self.cfg.train.dial_confidence:.0%} of {len(self.val_table)} held-out images' measured losses")
        if self.accelerator.is_main_process:
            from .visualize import training_curves

            training_curves(state["history"], out_dir)

    def summary(self, state: dict) -> dict:
        return {"reward_table_s": self.table_s, "skipped_images": state.get("skipped_images", 0)}

    def export(self, model: AdaTokModel, folder: Path, state: dict) -> dict:
        model.save_pretrained(folder)
        build_image_processor(model.config, self.cfg.data, train=False).save_pretrained(folder)
        return {"model_dir": str(folder)}


def train(cfg: PolicyTrainingConfig) -> dict:
    """Run stage-2 training; returns a summary (steps, wall time, reward-table seconds, export path)."""
    return run(cfg, PolicyStage)


def _online_step(model, policy, curve_head, x, spec, m, tc, lam, accelerator):
    """The paper's step: sample L per image, decode at L and at the rounded mean length (the
    baseline of eq. 8), plus ``curve_extra_lengths`` random lengths for the quality head."""
    grid = policy.grid
    with torch.no_grad():
        tokens, hidden, _, _ = model.forward_encoder(x)
        features = model.policy_features(hidden, x)
    with half_precision_autocast(accelerator):   # heads in bf16 under a DeepSpeed bf16 engine
        lengths, log_prob, entropy = policy.sample(features)
        mean_lengths = baseline_lengths(policy.expected_length(features), grid, tc.baseline_reading)
    with torch.no_grad():
        rl = mse_per_image(model.decode(tokens[:, : int(lengths.max())], lengths), x)
        rl_mean = mse_per_image(model.decode(tokens[:, : int(mean_lengths.max())], mean_lengths), x)
        measured_l, measured_rl = [lengths, mean_lengths], [rl, rl_mean]
        for _ in range(tc.curve_extra_lengths):
            extra = grid[torch.randint(0, grid.numel(), (x.shape[0],), device=grid.device)]
            measured_l.append(extra)
            measured_rl.append(mse_per_image(model.decode(tokens[:, : int(extra.max())], extra), x))
    reward = spec(rl, lengths, m)
    baseline = pool_baseline(spec(rl_mean, mean_lengths, m), tc.baseline_reading)
    advantage = relative_advantage(reward, baseline, tc.mu, tc.advantage)
    pg_loss, pg_logs = reinforce_loss(log_prob, advantage, entropy, lam)
    with half_precision_autocast(accelerator):
        curve_loss = curve_head.curve_loss(features, torch.stack(measured_l, 1), torch.stack(measured_rl, 1))
    return pg_loss, pg_logs, curve_loss, lengths, log_prob, entropy, reward, baseline, rl


def table_rows(total: int, table_size: int | None, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """The training data's rows of the reward table and of the held-out table: one seeded permutation of
    ``range(total)``, the table its first ``table_size`` entries and the held-out rows its last ``val_size``
    (so they never overlap, a larger table extends a smaller one, and the held-out rows stay put when the
    table grows), each sorted (files of a folder are then read in order).

    A uniform draw, not a class-stratified one: it needs no labels (folders and shards without any), is an
    unbiased sample of the training distribution for the dial's quantile, and an ImageNet-layout folder,
    listed class by class, is no longer cut to its first classes; with ~1,000 balanced classes a 100k draw
    holds 100 +- 10 images of each."""
    if val_size < 0:
        raise ValueError(f"train.val_size must be >= 0, got {val_size}")
    num_rows = min(table_size or total, total - val_size)
    if num_rows < 1:
        raise ValueError(f"the training data has {total} images: too few for train.val_size={val_size} held-out "
                         "images plus a reward table")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:num_rows]), sorted(order[total - val_size:]) if val_size else []


def _measurement_data(cfg: PolicyTrainingConfig, model_config, accelerator=None):
    """``(data set, collate, processor, stream record or None)`` of the training split through the
    deterministic evaluation transform (no random crop or flip): the images a table measures, the same on
    every run, so the table's rows, its policy features and the held-out losses that calibrate the dial repeat.

    A stream (tar shards, ``data.streaming: true``) has no length to draw from: its first
    ``train.table_size + train.val_size`` items (else all of ``data.limit``) in stream order become the
    split the table draws from (``data_setup.load_bounded_split``), copied once under
    ``<output_dir>/reward_table/stream_head`` by the main process and read back by the other ranks."""
    tc = cfg.train
    count = tc.table_size + tc.val_size if tc.table_size is not None else cfg.data.limit
    dataset, stream = load_bounded_split(
        cfg.data, cfg.data.train_split, tc.seed, count, "stage 2's reward table (train_policy)",
        "train.table_size (the table and its held-out rows are drawn from the first table_size + val_size items) "
        "or data.limit", limit=cfg.data.limit, folder=Path(tc.output_dir) / "reward_table" / "stream_head",
        accelerator=accelerator)
    data, collate = train_data_from(dataset, cfg, model_config, train=False)
    return data, collate, build_image_processor(model_config, cfg.data, train=False), stream


def _reward_tables(cfg: PolicyTrainingConfig, model: AdaTokModel, accelerator):
    """The training table (``train.table_size`` images of the training data) and, with ``train.val_size``,
    a held-out one (never in the table), both drawn by :func:`table_rows` with ``train.table_seed`` and
    measured through the evaluation transform; cached under ``<output_dir>/reward_table`` (the draw's rule
    and seed in the metadata, each image's row in the file). Returns ``(table, val_table or None, seconds
    spent measuring)``. The policy then trains on the table's own features, i.e. on the images measured."""
    from ..tokenizer.loading import model_fingerprint

    tc, grid = cfg.train, model.policy.grid
    folder = Path(tc.output_dir) / "reward_table"
    if cfg.data.flip or cfg.data.crop == "random" or cfg.data.transforms == "natural":
        warnings.warn("train.reward_table measures each image once, through the evaluation transform (centre "
                      "crop, no flip): the data section's training augmentation is not applied")
    data, collate, processor, stream = _measurement_data(cfg, model.config, accelerator)
    seed = tc.seed if tc.table_seed is None else tc.table_seed
    rows, val_rows = table_rows(len(data), tc.table_size, tc.val_size, seed)
    source = {"dataset": cfg.data.dataset, "split": cfg.data.train_split, "label_file": cfg.data.label_file,
              "limit": cfg.data.limit,     # natural_crops: its crops are drawn from train.seed
              "crops": [cfg.data.num_crops, tc.seed] if cfg.data.dataset == "natural_crops" else None,
              "processor": json.loads(json.dumps(processor.to_dict(), sort_keys=True, default=str))}
    if stream is not None:   # the rows drawn from are "the first N of the stream": another N is another table
        source["stream_head"] = stream
    draw = {"rule": "torch.randperm(total, seed): table = first table_size, held out = last val_size",
            "seed": seed, "total": len(data), "table_size": len(rows), "val_size": len(val_rows)}
    meta = {"tokenizer": model_fingerprint(cfg.tokenizer), "grid": grid.tolist(), "data": source, "rows": draw}

    def load_batches(index_batches: list[list[int]]):
        return epoch_batches(data, collate, index_batches, cfg.data.num_workers)()

    batch = max(tc.batch_size, 64)
    table, seconds = measure_shared(accelerator, folder / "train.safetensors", dict(meta, part="train"), model,
                                    load_batches, rows, batch, grid, "reward table (train)", tc.table_chunk_size)
    val_table = None
    if val_rows:
        val_table, val_s = measure_shared(accelerator, folder / "val.safetensors", dict(meta, part="held out"), model,
                                          load_batches, val_rows, batch, grid, "reward table (held out)",
                                          tc.table_chunk_size)
        seconds += val_s
    if stream is not None:   # the stream's copied head served only the measurement (every rank is past it)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(Path(tc.output_dir) / "reward_table" / "stream_head", ignore_errors=True)
    return table, val_table, seconds


def _warn_on_collapse(history: list[dict], max_steps: int, is_main: bool) -> None:
    """Warn once if the policy's entropy collapses (~0) within the first 10% of training."""
    step = history[-1]["step"]
    if is_main and step == max(1, max_steps // 10) and history[-1]["entropy"] < 0.05:
        warnings.warn(f"the length policy's entropy is {history[-1]['entropy']:.3f} after {step} steps "
                      "(10% of training): it has collapsed early; raise train.entropy_start or lower train.lr")


def main(argv: list[str] | None = None) -> dict:
    return run_main(PolicyTrainingConfig, train, argv, "model with policy")


if __name__ == "__main__":
    main()
