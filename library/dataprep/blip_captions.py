"""BLIP captioning through transformers (finetune/make_captions.py).

The model is a transformers `BlipForConditionalGeneration` with its `BlipProcessor`, from a Hugging Face id
(default `Salesforce/blip-image-captioning-large`, the same BLIP-large captioner kohya's script used) or a local
folder saved with `save_pretrained`. Captions are generated after the prompt "a picture of" (as the original BLIP
decoder does) and returned without it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_WEIGHTS = "Salesforce/blip-image-captioning-large"
PROMPT = "a picture of"


@dataclass
class GenerationOptions:
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    def generate_kwargs(self) -> dict:
        if self.beam_search:
            return {"do_sample": False, "num_beams": self.num_beams, "max_length": self.max_length,
                    "min_length": self.min_length, "repetition_penalty": 1.0}
        return {"do_sample": True, "top_p": self.top_p, "max_length": self.max_length,
                "min_length": self.min_length, "repetition_penalty": 1.1}


def check_weights_argument(weights: str) -> None:
    """Original BLIP `.pth` checkpoints (kohya's old default URL) are not transformers models: say what to pass."""
    if re.match(r"https?://", weights) or weights.endswith((".pth", ".pt", ".ckpt")):
        raise ValueError(f"--caption_weights {weights}: original BLIP .pth checkpoints are not supported; give a "
                         f"transformers BLIP model id or folder (default {DEFAULT_CAPTION_WEIGHTS})")


def load_captioner(weights: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) from a hub id or local folder; a one-line error when neither can be loaded."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    check_weights_argument(weights)
    if Path(weights).is_file():
        raise ValueError(f"--caption_weights {weights}: is a file; give the folder the model was saved to")
    try:
        processor = BlipProcessor.from_pretrained(weights)
        model = BlipForConditionalGeneration.from_pretrained(weights, dtype=dtype)
    except (OSError, ValueError) as e:  # missing files, offline hub, or not a valid folder / repo id
        raise FileNotFoundError(f"--caption_weights {weights}: cannot load a BLIP captioning model "
                                f"({str(e).splitlines()[0]}); without network, pass a local folder") from None
    return model.to(device).eval(), processor


def strip_prompt(text: str) -> str:
    text = text.strip()
    if text.lower().startswith(PROMPT):
        text = text[len(PROMPT):].strip()
    return text


@torch.no_grad()
def caption_batch(model, processor, images: list, opts: GenerationOptions) -> list[str]:
    """Captions of a batch of RGB images (PIL or HxWx3 uint8 arrays)."""
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    ids = model.generate(**inputs, **opts.generate_kwargs())
    return [strip_prompt(t) for t in processor.batch_decode(ids, skip_special_tokens=True)]


@dataclass
class CaptionResult:
    written: int = 0
    skipped_existing: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)


def caption_images(images: list[Path], model, processor, opts: GenerationOptions, extension: str,
                   batch_size: int = 1, workers: int = 2) -> CaptionResult:
    """Caption each image, writing `<stem><extension>` beside it atomically; unreadable images are listed."""
    from tqdm import tqdm

    from library.dataprep.metadata import prefetch, sidecar_path, write_text
    from library.images import load_image

    result = CaptionResult()
    batch: list[tuple[Path, object]] = []

    def flush() -> None:
        for (path, _), caption in zip(batch, caption_batch(model, processor, [im for _, im in batch], opts)):
            write_text(sidecar_path(path, extension), caption + "\n")
            result.written += 1
            logger.debug("%s: %s", path, caption)
        batch.clear()

    for path, image, err in tqdm(prefetch(images, load_image, workers), total=len(images), desc="captioning",
                                 smoothing=0.0):
        if err is not None:
            logger.error("%s", err)
            result.failures.append((path, str(err)))
            continue
        batch.append((path, image))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return result
