"""Tiny random pipelines of each base family (sd1, sd2, sdxl), built in code: nothing is downloaded.

Each has the architecture traits its family is detected by (models/base.py detect_family) at a
size that trains and draws a 32 px picture in well under a second on a CPU. The tokenizers are the
embedded model's. `save_pipeline` writes a diffusers folder, so tests load it with `load_base(folder)`
through the same from_pretrained path as a real model; `save_ldm_checkpoint` writes an SD 1.x
pipeline as one original-layout (LDM) .safetensors file, as civitai-style checkpoints come.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import embedded

RESOLUTION = 32  # pixels: a 16x16 latent through a VAE that downsamples 2x
FAMILIES = ("sd1", "sd2", "sdxl")


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(embedded.MODEL_DIR / "tokenizer")


def text_config(hidden_size: int, hidden_act: str, **extra) -> CLIPTextConfig:
    tok = tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tok.model_max_length, hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, sample_size=RESOLUTION,
    )


def sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x traits: one CLIP encoder (quick_gelu), 1x1-conv attention projections, epsilon prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=RESOLUTION // 2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae(), text_encoder=CLIPTextModel(text_config(32, "quick_gelu")), tokenizer=tokenizer(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x traits: OpenCLIP-like encoder (gelu), linear attention projections, per-block heads, v-prediction."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=RESOLUTION // 2, cross_attention_dim=48,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
        prediction_type="v_prediction"
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae(), text_encoder=CLIPTextModel(text_config(48, "gelu")), tokenizer=tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL traits: two CLIP encoders (the second with a projection), text_time added conditioning."""
    torch.manual_seed(seed)
    width_1, width_2, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=RESOLUTION // 2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=width_1 + width_2,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + width_2,  # six size ids + the pooled text embedding
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae(),
        text_encoder=CLIPTextModel(text_config(width_1, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(text_config(width_2, "gelu", projection_dim=width_2)),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )


BUILDERS = {"sd1": sd1_pipeline, "sd2": sd2_pipeline, "sdxl": sdxl_pipeline}


def save_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """A tiny pipeline of `family` saved as a diffusers folder (model_index.json and one folder per part)."""
    folder = Path(folder)
    BUILDERS[family](seed).save_pretrained(folder)
    return folder


# -- original (LDM) single-file layout --------------------------------------------------------------
# diffusers converts LDM checkpoints to its layout (loaders/single_file_utils.py) but ships no way
# back; this is the inverse of its SD 1.x mapping, after diffusers' own
# scripts/convert_diffusers_to_original_stable_diffusion.py, generalised from SD 1.5's fixed
# four levels of two layers to any number of levels and layers, so a tiny model can round-trip.

def save_ldm_checkpoint(pipe: StableDiffusionPipeline, path: str | Path) -> Path:
    """Write an SD 1.x pipeline as one .safetensors in the original layout (what `from_single_file` reads)."""
    tensors = {}
    for name, tensor in _ldm_unet(pipe.unet).items():
        tensors["model.diffusion_model." + name] = tensor
    for name, tensor in _ldm_vae(pipe.vae).items():
        tensors["first_stage_model." + name] = tensor
    for name, tensor in pipe.text_encoder.state_dict().items():
        # transformers 5 names CLIP's weights without the "text_model." that checkpoints carry
        name = name if name.startswith("text_model.") else "text_model." + name
        tensors["cond_stage_model.transformer." + name] = tensor
    path = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _ldm_unet(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    config, layers = unet.config, unet.config.layers_per_block
    levels = len(config.block_out_channels)
    prefixes = [  # (ldm, diffusers)
        ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1."),
    ]
    for i in range(levels):
        for j in range(layers):  # each down level: `layers` (resnet, attention) pairs, then a downsampler
            prefixes.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            prefixes.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        prefixes.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):  # each up level: one more pair, then an upsampler after them
            prefixes.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            prefixes.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        prefixes.append((f"output_blocks.{(layers + 1) * i + layers}.{2 if has_attention else 1}.",
                         f"up_blocks.{i}.upsamplers.0."))
    resnet_parts = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                    ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    result = {}
    for name, tensor in unet.state_dict().items():
        ldm = name
        if "resnets" in name:
            for old, new in resnet_parts:
                ldm = ldm.replace(new, old)
        ldm = _swap_prefix(ldm, prefixes)
        result[ldm] = tensor
    return result


def _ldm_vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels, layers = len(vae.config.block_out_channels), vae.config.layers_per_block
    prefixes = [("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
                ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}.") for i in range(2)]
    for i in range(levels):
        prefixes += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        prefixes.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
        # the decoder's levels are numbered the other way round in LDM
        prefixes += [(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
                     for j in range(layers + 1)]
        prefixes.append((f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    attention_parts = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                       ("proj_out.", "to_out.0.")]
    result = {}
    for name, tensor in vae.state_dict().items():
        ldm = _swap_prefix(name, prefixes).replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in ldm:
            head, _, tail = ldm.rpartition(".attn_1.")
            for old, new in attention_parts:
                if tail.startswith(new):
                    tail = old + tail[len(new):]
            ldm = f"{head}.attn_1.{tail}"
            if tensor.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                tensor = tensor[:, :, None, None]
        result[ldm] = tensor
    return result


def _swap_prefix(name: str, prefixes: list[tuple[str, str]]) -> str:
    for ldm, diffusers in prefixes:
        if name.startswith(diffusers):
            return ldm + name[len(diffusers):]
    return name
