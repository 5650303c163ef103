"""Automatic content captions for training images: pick a captioner that fits the base model.

A style adapter learns what its captions leave unsaid, so each image is captioned with its
content only ("a red star on a blue background"), never with the look: the adapter then learns the
look, not the objects. Which captioner can say what is in a picture depends on the base model:

- the embedded base draws only procedural scenes, and embedded/captioner.py reads exactly those,
  in the grammar the model was pretrained on;
- any other base (SD 1.x, 2.x, SDXL) gets BLIP (Salesforce/blip-image-captioning-base), if its
  weights are in the Hugging Face cache. It is downloaded only when STYLE_STUDIO_CAPTIONER_ONLINE=1;
  STYLE_STUDIO_CAPTIONER names another BLIP model id or a local folder.

When no captioner is available, the captions are None (the caller falls back to the caption
template) and the note says why and how to get one. Nothing here raises for a missing model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

import embedded

BLIP_ID = "Salesforce/blip-image-captioning-base"
MODEL_ENV = "STYLE_STUDIO_CAPTIONER"
ONLINE_ENV = "STYLE_STUDIO_CAPTIONER_ONLINE"
BATCH = 8  # BLIP images per forward pass: bounded memory on CPU
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
MAX_TOKENS = 30  # BLIP's captions are short; this only stops a runaway generation

Captioner = Callable[[Sequence[Image.Image]], list[str]]


def auto_captions(images: Sequence[Image.Image], model_id: str, family: str) -> tuple[list[str | None], str]:
    """Content captions for `images` (no trigger word) and a one-line note on how they were made.

    A caption is None where there is none to give: the caller then uses its caption template.
    """
    if not images:
        return [], "No images to caption."
    if model_id == embedded.EMBEDDED_ID:
        return _embedded_captions(images)
    return _blip_captions(images, family)


def _embedded_captions(images: Sequence[Image.Image]) -> tuple[list[str | None], str]:
    from embedded import captioner  # imports torch: only when captions are asked for

    if not captioner.available():
        return [None] * len(images), (
            f"The embedded scene captioner's weights are missing ({captioner.WEIGHTS}); images without a .txt "
            "caption use the caption template. Run `python -m embedded.captioner` to train it.")
    return list(captioner.caption_images(images)), (
        f"Captioned {_count(images)} with the embedded scene captioner (it names count, shape, colours, size, "
        "position and texture; words it is unsure of are left out).")


def _blip_captions(images: Sequence[Image.Image], family: str) -> tuple[list[str | None], str]:
    model_id = os.environ.get(MODEL_ENV) or BLIP_ID
    online = os.environ.get(ONLINE_ENV) == "1"
    try:
        # Looking in the cache first spares importing transformers (seconds) just to find nothing.
        if not online and not _cached(model_id):
            raise FileNotFoundError(model_id)
        texts = _load_blip(model_id, online)(images)
    except OSError:  # not cached, or transformers' "cannot reach the Hub": the user can fix that
        where = "could not be downloaded" if online else "is not in the Hugging Face cache"
        return [None] * len(images), (
            f"No captioner for this {FAMILY_NAMES.get(family, family)} base model is available"
            f"{'' if online else ' offline'} ({model_id} {where}); images without a .txt caption use the caption "
            "template. " + ("Check the connection, or write .txt captions." if online else
                            f"Set {ONLINE_ENV}=1 to download it, or write .txt captions."))
    except Exception as error:  # a broken download or an incompatible model: captions are optional, go on
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        return [None] * len(images), (
            f"The captioner {model_id} could not be used ({type(error).__name__}: {reason}); images without a "
            f".txt caption use the caption template. Write .txt captions, or set {MODEL_ENV} to another BLIP model.")
    # An empty caption says nothing: let the template speak for that image instead.
    return [text.strip() or None for text in texts], f"Captioned {_count(images)} with {model_id}."


def _cached(model_id: str) -> bool:
    """Whether `model_id` is a local folder or a Hub model with a config in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model_id).is_dir():
        return True
    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a valid Hub id (a missing folder, say): not cached either
        return False


@functools.cache
def _load_blip(model_id: str, online: bool) -> Captioner:
    """BLIP's processor and model for `model_id`, as a batched captioning function (loaded once per id).

    A failed load raises and is not cached, so a model downloaded later is picked up.
    """
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_id, local_files_only=not online)
    model = BlipForConditionalGeneration.from_pretrained(model_id, local_files_only=not online).eval()

    @torch.no_grad()
    def caption(images: Sequence[Image.Image]) -> list[str]:
        texts = []
        for start in range(0, len(images), BATCH):
            batch = [image.convert("RGB") for image in images[start : start + BATCH]]
            tokens = model.generate(**processor(images=batch, return_tensors="pt"), max_new_tokens=MAX_TOKENS)
            texts += processor.batch_decode(tokens, skip_special_tokens=True)
        return texts

    return caption


def _count(images: Sequence[Image.Image]) -> str:
    return f"{len(images)} image" + ("" if len(images) == 1 else "s")
