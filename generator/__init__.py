"""Generators over variable-length AdaTok tokens (installed as ``adatok_vlm.generator``).

* :class:`AdaTokDiT` / :class:`AdaTokDiTConfig`: a class- and length-conditional DiT trained with
  flow matching (``flow_matching``: objective, Euler/Heun samplers, classifier-free guidance).
* :class:`VarLenCollator`, :class:`LengthGroupedBatchSampler`: padded batches of similar lengths.
* :class:`LengthSampler`: per-class token-length histograms for generation.
* :class:`ClassToImagePipeline`: class label -> tokens -> image.

``import adatok_vlm`` adds the DiT to ``transformers.AutoConfig`` / ``AutoModel`` (:mod:`adatok_vlm.registration`).

How the pieces fit (token extraction, then training)::

    # extraction: items {"tokens": [L_i, D], "length": L_i, "label": y_i} from adatok.encode(x, "auto")
    stats = RunningTokenStats(D)                       # stats.update(enc.tokens, enc.lengths) per batch
    model = AdaTokDiT(AdaTokDiTConfig.from_preset("dit-b", token_dim=D, max_tokens=m, num_classes=C))
    model.set_token_statistics(stats.mean, stats.std)
    model.set_length_histograms(LengthSampler.from_lengths(all_lengths, all_labels, C, m))

    # training: similar lengths per batch, padded to the batch's longest
    sampler = LengthGroupedBatchSampler(all_lengths, batch_size, seed, rank=rank, world_size=world)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=VarLenCollator(max_length=m))
    for batch in loader:                               # sampler.set_epoch(epoch) each epoch
        x0 = model.normalize_tokens(batch["tokens"], batch["lengths"])
        out = flow_matching_loss(wrapped_model, x0, batch["lengths"], batch["labels"],
                                 null_class=model.null_class, class_dropout_prob=model.config.class_dropout_prob)
        out.loss.backward()                            # EMA: adatok_vlm.training.engine.EMA

    enc = model.generate(labels, cfg_scale=4.0)        # lengths from the histograms, de-normalised tokens
"""

from .collator import LengthGroupedBatchSampler, VarLenCollator, padding_fraction
from .configuration_dit import DIT_PRESETS, AdaTokDiTConfig
from .flow_matching import (
    FlowMatchingOutput,
    cfg_mix,
    drop_class_labels,
    flow_matching_loss,
    guided_velocity,
    integrate,
    interpolate,
    masked_mse,
    sample_flow,
    sample_timesteps,
    velocity_target,
)
from .length_sampler import LengthSampler
from .modeling_dit import AdaTokDiT, AdaTokDiTPreTrainedModel, RunningTokenStats
from .pipeline import ClassToImageOutput, ClassToImagePipeline


__all__ = [
    "DIT_PRESETS",
    "AdaTokDiT",
    "AdaTokDiTConfig",
    "AdaTokDiTPreTrainedModel",
    "ClassToImageOutput",
    "ClassToImagePipeline",
    "FlowMatchingOutput",
    "LengthGroupedBatchSampler",
    "LengthSampler",
    "RunningTokenStats",
    "VarLenCollator",
    "cfg_mix",
    "drop_class_labels",
    "flow_matching_loss",
    "guided_velocity",
    "integrate",
    "interpolate",
    "masked_mse",
    "padding_fraction",
    "sample_flow",
    "sample_timesteps",
    "velocity_target",
]
