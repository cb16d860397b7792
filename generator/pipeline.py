"""Class label -> image: a DiT generates variable-length AdaTok tokens, AdaTok decodes them.

Example::

    pipe = ClassToImagePipeline(dit, adatok)          # or ClassToImagePipeline.from_pretrained(dit_dir, adatok_dir)
    images = pipe([207, 360], cfg_scale=4.0, num_steps=50, generator=torch.Generator().manual_seed(0))
    images[0].save("dog.png")                          # PIL images; the output is a list of them
    images.lengths                                     # LongTensor [2]: tokens each image used
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..tokenizer.image_processing_adatok import to_uint8
from .modeling_dit import AdaTokDiT

OUTPUT_TYPES = ("pil", "pt")


@dataclass
class ClassToImageOutput:
    """Generated images and the token sequences behind them.

    Behaves like its ``images`` (``len``, indexing and iteration), so ``pipe(labels)[0]`` is the first
    image.

    Args:
        images: a list of ``PIL.Image`` (``output_type="pil"``) or a float tensor ``[B, 3, H, W]`` in
            [0, 1] (``output_type="pt"``).
        lengths: ``[B]`` the token count of each image.
        tokens: ``[B, max(lengths), D]`` the generated (de-normalised) tokens, zero past each length.
    """

    images: list | torch.Tensor
    lengths: torch.LongTensor
    tokens: torch.FloatTensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]

    def __iter__(self):
        return iter(self.images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` floats in [0, 1] -> RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


class ClassToImagePipeline:
    """Class-conditional image generation with an :class:`AdaTokDiT` and an ``AdaTokModel``.

    Args:
        dit: the generator over tokens (its ``token_dim`` must match the tokenizer's and its
            ``max_tokens`` must not exceed the tokenizer's ``num_latent_tokens``).
        adatok: the tokenizer whose ``decode(tokens, lengths)`` turns tokens into images.
    """

    def __init__(self, dit: AdaTokDiT, adatok):
        if not isinstance(dit, AdaTokDiT):
            raise TypeError(f"dit must be an AdaTokDiT, got {type(dit).__name__}")
        if not hasattr(adatok, "decode") or not hasattr(adatok, "config"):
            raise TypeError(f"adatok must be an AdaTokModel (with .decode and .config), got {type(adatok).__name__}")
        if dit.config.token_dim != adatok.config.token_dim:
            raise ValueError(f"the DiT generates {dit.config.token_dim}-channel tokens but the tokenizer decodes "
                             f"{adatok.config.token_dim}-channel tokens (token_dim)")
        if dit.config.max_tokens > adatok.config.num_latent_tokens:
            raise ValueError(f"the DiT generates up to {dit.config.max_tokens} tokens but the tokenizer decodes at "
                             f"most {adatok.config.num_latent_tokens} (num_latent_tokens)")
        self.dit, self.adatok = dit, adatok

    @classmethod
    def from_pretrained(cls, dit_path: str, adatok_path: str, **kwargs) -> "ClassToImagePipeline":
        """Load both models from local folders (``kwargs`` go to both ``from_pretrained`` calls)."""
        from ..tokenizer import AdaTokModel

        return cls(AdaTokDiT.from_pretrained(dit_path, **kwargs).eval(),
                   AdaTokModel.from_pretrained(adatok_path, **kwargs).eval())

    def to(self, device) -> "ClassToImagePipeline":
        self.dit.to(device)
        self.adatok.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @torch.no_grad()
    def __call__(self, class_labels, num_tokens=None, cfg_scale: float = 4.0, num_steps: int = 50,
                 sampler: str = "euler", guidance_interval: tuple[float, float] | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", batch_size: int | None = None,
                 progress: bool = False, return_dict: bool = True):
        """Generate one image per class label.

        Args:
            class_labels: an int, a list of ints or a LongTensor ``[B]``.
            num_tokens: ``None`` (per-class length histogram stored in the DiT), an int or a LongTensor ``[B]``.
            cfg_scale / num_steps / sampler / guidance_interval / generator: see :meth:`AdaTokDiT.generate`.
            output_type: ``"pil"`` (list of PIL images) or ``"pt"`` (float ``[B, 3, H, W]`` in [0, 1]).
            batch_size: generate in chunks of this many images (memory); None = all at once.
        Returns:
            :class:`ClassToImageOutput` (acts as the list of images), or ``(images, lengths)`` when
            ``return_dict=False``.
        """
        # Every argument is checked before any work (the DiT's own checks, on the whole batch).
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, (bool, np.bool_)):
            class_labels = [int(class_labels)]
        labels, _, num_steps = self.dit.check_generate_arguments(class_labels, num_tokens, cfg_scale, num_steps,
                                                                 sampler, guidance_interval, generator)
        b = labels.shape[0]
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        for name, flag in (("progress", progress), ("return_dict", return_dict)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        step = int(batch_size or b)
        images, lengths, tokens = [], [], []
        for start in range(0, b, step):
            chunk = slice(start, min(start + step, b))
            n = num_tokens[chunk] if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() == 1 else num_tokens
            enc = self.dit.generate(labels[chunk], num_tokens=n, cfg_scale=cfg_scale, num_steps=num_steps,
                                    sampler=sampler, guidance_interval=guidance_interval, generator=generator,
                                    progress=progress)
            decoded = self.adatok.decode(enc.tokens.to(self.adatok.device), enc.lengths.to(self.adatok.device))
            images.append(decoded.float().cpu())
            lengths.append(enc.lengths.cpu())
            tokens.append(enc.tokens.cpu())
        pixels = torch.cat(images)
        longest = max(t.shape[1] for t in tokens)
        tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in tokens])
        out_images = to_pil(pixels) if output_type == "pil" else pixels
        lengths = torch.cat(lengths)
        if not return_dict:
            return out_images, lengths
        return ClassToImageOutput(images=out_images, lengths=lengths, tokens=tokens)
