"""Train the class-conditional DiT over variable-length AdaTok tokens with flow matching (paper App. B).

    python -m adatok_vlm.training.extract_tokens --tokenizer outputs/demo-fmnist/model --output_dir outputs/tokens
    python -m adatok_vlm.training.train_dit --config configs/dit/dit-tiny.yaml \
        --data.tokens outputs/tokens --output_dir outputs/dit --tokenizer outputs/demo-fmnist/model
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..generator import (AdaTokDiT, AdaTokDiTConfig, ClassToImagePipeline, LengthGroupedBatchSampler, VarLenCollator,
                         flow_matching_loss, padding_fraction)
from ..generator.configuration_dit import class_names_from_config
from ..tokenizer.loading import model_fingerprint
from .visualize import class_grid, to_uint8
from .config import check_fields
from .distributed import assert_replicas_match, materialize, mean_over_ranks, param_gatherer
from .engine import EMA
from .extract_tokens import TokenCache
from .loop import LoopConfig, Stage, main as run_main, run

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
class DiTTrainConfig(LoopConfig):
    output_dir: str = "outputs/dit"
    max_steps: int = 100_000
    batch_size: int = 256                    # per device
    lr: float = 1e-4
    warmup_steps: int = 1000
    ema_decay: float = 0.9999                # 0 disables EMA (the raw model is exported)
    time_distribution: str = "logit_normal"  # flow time t: logit_normal (SD3) | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    log_every: int = 50
    sample_every: int = 5000                 # sample grids (needs --tokenizer); 0 disables
    save_every: int = 5000


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
    check_fields(AdaTokDiTConfig, section)
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
# the stage
# =============================================================================================
class DiTStage(Stage):
    """Flow matching over length-grouped batches of cached tokens, for :func:`~.loop.run`."""

    desc = "DiT (flow matching)"

    def __init__(self, cfg: DiTTrainingConfig, accelerator):
        tc, self.cfg, self.accelerator = cfg.train, cfg, accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        self.cache = cache = TokenCache(cfg.data.tokens, limit=cfg.data.limit)
        model = AdaTokDiT(build_dit_config(cfg.model, cache.meta))
        assert_replicas_match(accelerator, model, "DiT")
        self.num_parameters = model.num_parameters()                # before ZeRO-3 shards the weights
        self.sampler = LengthGroupedBatchSampler(cache.lengths, tc.batch_size, seed=tc.seed, drop_last=True,
                                                 mega_batch_mult=cfg.data.mega_batch_mult, rank=rank, world_size=world)
        collate = VarLenCollator(pad_to_multiple_of=cfg.data.pad_to_multiple_of, max_length=model.config.max_tokens)
        self.loader = DataLoader(cache, batch_sampler=self.sampler, collate_fn=collate,
                                 num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        # The EMA copies the whole model before prepare (under ZeRO-3 prepare shards it in place).
        self.ema = EMA(model, tc.ema_decay, gather=param_gatherer(accelerator)).to(accelerator.device) \
            if tc.ema_decay > 0 else None
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw = accelerator.unwrap_model(self.model)
        self.replicated = {"ema": self.ema} if self.ema is not None else {}
        self.sampling = bool(cfg.tokenizer and tc.sample_every)    # the same on every rank
        self.last_sampled = -1
        self.adatok = self._sampling_tokenizer() if self.sampling and accelerator.is_main_process else None

    def _sampling_tokenizer(self):
        """The AdaTok that decodes the sample grids (main process; a forked RNG leaves the training stream alone)."""
        from ..tokenizer import AdaTokModel

        path = self.cfg.tokenizer
        with torch.random.fork_rng(devices=[]):
            adatok = AdaTokModel.from_pretrained(path).to(self.accelerator.device).eval()
        ClassToImagePipeline(self.raw, adatok)                     # token_dim / max_tokens must fit: fail now
        if model_fingerprint(path) != self.cache.meta.get("tokenizer_fingerprint"):
            warnings.warn(f"--tokenizer {path} is not the tokenizer that made the token cache "
                          f"({self.cache.meta.get('tokenizer')}): the sample grids will decode with other weights")
        return adatok

    def counters(self) -> dict:
        return {"tokens": 0}

    def write_pretrained(self, folder: Path) -> None:
        self.raw.config.save_pretrained(folder)

    def banner(self) -> str:
        cache, dc = self.cache, self.cfg.data
        pad = padding_fraction(self.sampler.global_batches(0), cache.lengths, dc.pad_to_multiple_of)
        return (f"DiT over AdaTok tokens: {self.num_parameters / 1e6:.2f}M parameters, {len(cache)} images "
                f"({cache.meta['num_classes']} classes, mean length {float(cache.lengths.float().mean()):.2f} of "
                f"{self.raw.config.max_tokens}, token_dim {self.raw.config.token_dim}), padding {pad:.1%}")

    def batches(self):
        return self.loader

    def prepare(self, batch, state: dict):
        device = self.accelerator.device
        return (batch["tokens"].to(device, non_blocking=True),                   # [B, Lb, D]
                batch["lengths"].to(device), batch["labels"].to(device))       # [B], [B]

    def step(self, batch, state: dict) -> dict:
        tc, raw, (tokens, lengths, labels) = self.cfg.train, self.raw, batch
        g = batch_generator(self.accelerator.device, tc.seed, self.accelerator.process_index, state["epoch"],
                            state["batch"])
        x0 = raw.normalize_tokens(tokens, lengths)
        self.out = flow_matching_loss(self.model, x0, lengths, labels, null_class=raw.null_class,
                                      class_dropout_prob=raw.config.class_dropout_prob,
                                      time_distribution=tc.time_distribution, logit_mean=tc.logit_mean,
                                      logit_std=tc.logit_std, generator=g)
        self.batch = batch
        return {"loss": self.out.loss}

    def on_step_end(self, state: dict, log: bool) -> dict | None:
        tokens, lengths, _ = self.batch
        state["tokens"] += int(lengths.sum()) * self.accelerator.num_processes
        values = None
        if log:
            values = mean_over_ranks(self.accelerator, {"loss": float(self.out.loss.detach())})
            values.update(mean_length=float(lengths.float().mean()), padded_length=int(tokens.shape[1]))
        if self.sampling and state["step"] % self.cfg.train.sample_every == 0:
            self.write_samples(state["step"])
        return values

    def write_samples(self, step: int) -> None:
        """A class grid from the EMA (or a consolidated copy: a collective under ZeRO-3) on the main process."""
        dit = self.ema.shadow if self.ema is not None else materialize(self.accelerator, self.model)
        if self.adatok is not None:
            sample_grid(dit, self.adatok, self.cfg.sample,
                        Path(self.cfg.train.output_dir) / "samples" / f"step-{step:08d}.png")
        self.last_sampled = step
        self.accelerator.wait_for_everyone()

    def on_train_end(self, state: dict) -> None:
        if self.sampling and self.last_sampled != state["step"]:
            self.write_samples(state["step"])

    def summary(self, state: dict) -> dict:
        return {"num_parameters": self.num_parameters}

    def export(self, model: AdaTokDiT, folder: Path, state: dict) -> dict:
        provenance = {k: self.cache.meta.get(k) for k in ("tokenizer", "tokenizer_fingerprint", "num_tokens",
                                                           "num_items", "mean_length", "class_names")}
        provenance["path"] = str(Path(self.cfg.data.tokens).resolve())
        folder.mkdir(parents=True, exist_ok=True)   # before the save: its model card reads the provenance
        (folder / "token_cache.json").write_text(json.dumps(provenance, indent=1), encoding="utf-8")
        model.save_pretrained(folder)
        return {"model_dir": str(folder)}


def train(cfg: DiTTrainingConfig) -> dict:
    """Train the DiT on a token cache; returns a summary (steps, wall time, losses, export path)."""
    return run(cfg, DiTStage)


def main(argv: list[str] | None = None) -> dict:
    return run_main(DiTTrainingConfig, train, argv, "DiT")


if __name__ == "__main__":
    main()
