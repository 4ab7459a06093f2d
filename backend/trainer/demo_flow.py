"""Tiny SD3.5- and Flux.1-dev-shaped demo models: the flow-matching families, built from config.

Like the SD demo models (backend/trainer/demo.py): random weights with the real architectures'
shapes scaled down, tokenizers built from the demo's small word list (no downloads), and the same
bytes on every call. Each folder is a diffusers layout that `StableDiffusion3Pipeline` /
`FluxPipeline.from_pretrained` loads offline.

What the real models have and these keep, scaled down:
- SD3.5 (medium): an MMDiT with RMS q/k norm and dual-attention (MMDiT-X) blocks in its first layers,
  two CLIP encoders with projections (CLIP-L, CLIP-G; tokenizer_2 pads with "!"), whose hidden states
  are concatenated and zero-padded to the T5 width (768 + 1280 = 2048 -> 4096; here 32 + 48 = 80 ->
  96), pooled projections of both (2048; here 80), a 16-channel VAE with scaling 1.5305 / shift
  0.0609 and no quant convs, a flow-matching Euler scheduler with shift 3.0.
- Flux.1-dev: double- and single-stream blocks with 3-axis RoPE, guidance embedding, CLIP-L pooled
  output (768; here 32) and T5 hidden states (4096; here 64), 2x2-packed 16-channel latents (64
  transformer channels), a VAE with scaling 0.3611 / shift 0.1159, a flow-matching Euler scheduler
  with resolution-dependent (dynamic) shifting.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from backend.trainer.demo import VOCAB_WORDS, _text_encoder, build_tokenizer

T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece vocabulary
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def t5_vocab(words: tuple[str, ...] | list[str] = VOCAB_WORDS) -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout: <pad>, </s>, <unk>, the word-start marker, whole demo
    words (as "▁word", cheap), then single characters so other text still splits (expensive)."""
    pieces = [(t, 0.0) for t in T5_SPECIAL] + [("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ",.!?'-:;()"]
    return pieces


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (tokenizers-backed Unigram, like T5TokenizerFast) over the demo words; it saves as
    tokenizer.json and loads back with from_pretrained offline. No sentinel (<extra_id_N>) tokens: the
    pipelines never use them."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)


def _t5(vocab_size: int, d_model: int):
    """A tiny T5 v1.1-shaped encoder (gated GELU, untied embeddings, relative position buckets)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=d_model * 2,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=d_model // 16,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _vae16(scaling_factor: float, shift_factor: float):
    """The SD3/Flux VAE shape: 8x downsampling, 16 latent channels, no quant convs, a shift factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_sd3(out: Path) -> Path:
    """A tiny SD3.5-medium-shaped diffusers folder (StableDiffusion3Pipeline layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(3535)
    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(pad_token="!"), build_t5_tokenizer()
    clip_l, clip_g, t5_width = 32, 48, 96
    te1 = _text_encoder(len(tokenizer), with_projection=True, hidden=clip_l)
    te2 = _text_encoder(len(tokenizer_2), with_projection=True, hidden=clip_g, hidden_act="gelu")
    te3 = _t5(len(tokenizer_3), t5_width)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # 64 px at 8x: the pipeline's default size
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5_width,  # CLIP hidden states are zero-padded to the T5 width
        caption_projection_dim=2 * 8,  # = the transformer width, as 1536 in SD3.5 medium
        pooled_projection_dim=clip_l + clip_g,
        out_channels=16,
        pos_embed_max_size=32,  # up to 512 px
        dual_attention_layers=(0,),  # SD3.5 medium: MMDiT-X blocks in its first layers
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae16(**SD3_VAE),
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=te3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_flux(out: Path) -> Path:
    """A tiny Flux.1-dev-shaped diffusers folder (FluxPipeline layout, guidance-distilled shape)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(1111)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    clip_l, t5_width = 32, 64
    te1 = _text_encoder(len(tokenizer), hidden=clip_l)
    te2 = _t5(len(tokenizer_2), t5_width)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_l,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim, as (16, 56, 56) -> 128
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae16(**FLUX_VAE),
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
