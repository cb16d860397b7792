"""``adatok export``: turn a DeepSpeed ZeRO training checkpoint into a ``save_pretrained`` folder.

    adatok export --checkpoint outputs/tok/checkpoints/step-00001000 --out outputs/tok/export
    adatok export --checkpoint outputs/tok --out outputs/tok/export       # its latest complete checkpoint
    python -m adatok_vlm.training.export --checkpoint ... --out ...

A ZeRO-2/3 run (see ``checkpointing``) leaves, per step, one DeepSpeed checkpoint per engine
(``model/`` for the tokenizer and the DiT, ``heads/`` for the stage-2 policy) holding every rank's
fp32 partitions, next to the ``config.json`` (and processor files) the trainer wrote. DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` merges the partitions into one fp32 state dict on the
CPU (no GPU, no process group, any number of ranks at save time); the model is rebuilt from its
config with ``AutoModel.from_config``, loaded strictly, and saved with ``save_pretrained``
(safetensors), so ``AutoModel.from_pretrained(out)`` gives the trained model. For the stage-2 heads,
``export.json`` names the frozen stage-1 folder whose weights complete the model.

The exported folder is also how a run moves to another world size: point the next run at it (e.g.
``--tokenizer`` for stage 2, or a fresh stage with ``--model`` from the export).

DeepSpeed's shard files are torch pickles (``torch.load(weights_only=False)`` inside DeepSpeed): only
export checkpoints you trust, such as your own runs'.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .checkpointing import STATE_FILE, CheckpointManager

COPIED_FILES = ("preprocessor_config.json", "token_cache.json")


def find_step_dir(path: str | Path) -> Path:
    """A step folder, a ``checkpoints/`` folder or a run's output folder -> the step folder to export."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for output_dir in (path, path.parent if path.name == "checkpoints" else None):
        if output_dir is not None and (output_dir / "checkpoints").is_dir():
            latest = CheckpointManager(output_dir, {}, {}).latest()
            if latest is not None:
                return latest
    raise FileNotFoundError(f"no complete training checkpoint at {path} (expected a step-XXXXXXXX folder with "
                            f"{STATE_FILE}, or an output folder holding checkpoints/)")


def engine_tags(step_dir: Path) -> list[str]:
    """The DeepSpeed checkpoints (sub-folders with the trainer's config.json) inside a step folder."""
    return sorted(p.name for p in step_dir.iterdir()
                  if p.is_dir() and (p / "config.json").is_file() and any(p.glob("*_optim_states.pt")))


def consolidate(checkpoint: str | Path, tag: str | None = None):
    """Load the consolidated fp32 model of a ZeRO checkpoint; returns ``(model, step_dir, tag)``."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import adatok_vlm  # noqa: F401  (registers the Auto classes)

    step_dir = find_step_dir(checkpoint)
    tags = engine_tags(step_dir)
    if not tags:
        raise ValueError(f"{step_dir} holds no DeepSpeed ZeRO checkpoint (a run without --train.deepspeed writes "
                         "<name>.safetensors files instead; the trainer's <output_dir>/model is its export)")
    if tag is None:
        if len(tags) > 1:
            raise ValueError(f"{step_dir} holds several engines {tags}: choose one with --tag")
        tag = tags[0]
    elif tag not in tags:
        raise ValueError(f"--tag {tag!r} not in {step_dir}; found {tags}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    folder = step_dir / tag
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModel.from_config(config)
    meta_file = folder / "export.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    if meta.get("base_model"):
        base = transformers.AutoModel.from_pretrained(meta["base_model"]).state_dict()
        state = {**base, **state}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the consolidated weights of {folder} do not fit {type(model).__name__}: missing "
                         f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    return model.eval(), step_dir, tag


def export(checkpoint: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Consolidate ``checkpoint`` and ``save_pretrained`` it (plus its processor files) to ``out``."""
    model, step_dir, tag = consolidate(checkpoint, tag)
    out = Path(out)
    model.save_pretrained(out)
    for name in COPIED_FILES:
        if (step_dir / tag / name).is_file():
            shutil.copyfile(step_dir / tag / name, out / name)
    state = json.loads((step_dir / STATE_FILE).read_text(encoding="utf-8"))
    (out / "export_source.json").write_text(json.dumps({"checkpoint": str(step_dir.resolve()), "engine": tag,
                                                        "step": state.get("step")}, indent=1), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="adatok export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a step-XXXXXXXX folder, its checkpoints/ folder, or the run's output folder (latest)")
    parser.add_argument("--out", required=True, help="where to write the save_pretrained folder")
    parser.add_argument("--tag", default=None, help="the engine to export when a step holds several (model, heads)")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, args.tag)
    print(f"exported {out}")
    return out


if __name__ == "__main__":
    main()
