"""The embedded default model's architecture: a tiny Stable-Diffusion-architecture pipeline and its tokenizer.

It has every part of a real SD 1.x pipeline (CLIP tokenizer with BPE merges and text encoder,
VAE, cross-attention UNet, DDIM scheduler) at a size that draws a 64 px picture in well under a
second on a laptop CPU. `python -m embedded.pretrain` builds the architecture below and trains it
on procedural captioned scenes (embedded/scenes.py); the result is committed in the diffusers
folder layout at embedded.MODEL_DIR and loaded with `from_pretrained`, like any other model.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from embedded import scenes

SEED = 20261122
RESOLUTION = 64  # pixels; the VAE downsamples 4x, so the UNet works on 16x16 latents

# Every word here is a single token, so prompts built from them condition cleanly.
WORDS = scenes.vocabulary() + "style image picture of in with and".split()


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every byte plus each word in WORDS as one token."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Merge left to right: "red" -> ("r","e") -> ("re","d</w>"): every prefix becomes a token.
        _join(list(word[:-1]) + [word[-1] + "</w>"], merges, vocab)
    specials = ("<|startoftext|>", "<|endoftext|>")
    # BPE applies merges by rank, so an early merge from one word can split another ("gr|een").
    # Join the pieces such a word ends in with merges ranked last, until every word is one token.
    while True:
        full_vocab = {**vocab, **{token: len(vocab) + i for i, token in enumerate(specials)}}
        tokenizer = CLIPTokenizer(vocab=full_vocab, merges=list(merges))
        split = [tokenizer.tokenize(word) for word in WORDS]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            break
        for pieces in split:
            _join(pieces, merges, vocab)
    tokenizer.model_max_length = 77
    return tokenizer


def _join(pieces: list[str], merges: list[tuple[str, str]], vocab: dict[str, int]) -> None:
    """Append the merges that join `pieces` left to right, and the tokens they make."""
    merged = pieces[0]
    for piece in pieces[1:]:
        if (merged, piece) not in merges:
            merges.append((merged, piece))
        merged += piece
        vocab.setdefault(merged, len(vocab))


def build_untrained_pipeline() -> StableDiffusionPipeline:
    """The embedded architecture with fresh weights from SEED (the starting point of pretraining)."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=RESOLUTION,
        )
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 4,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            cross_attention_dim=128,
            attention_head_dim=4,
            norm_num_groups=32,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
