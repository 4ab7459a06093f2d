"""The embedded demo: tiny SD1.5-, SD2.x-768-v- and SDXL-shaped models and a drawn image set.

Nothing can be downloaded at run time, so Lathe builds its own base model: random weights with the
real architectures' shapes (scaled down), a CLIP tokenizer built from a small local vocabulary, and a
kohya-layout image folder of coloured shapes with captions. Everything is deterministic: the same
call writes the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from backend.trainer.clip_tokenizer import bytes_to_unicode

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
EXTRA_WORDS = ("a", "an", "on", "of", "the", "background", "shape", "photo", "drawing", "lathe", "demo", "small", "big")
VOCAB_WORDS = sorted({*COLORS, *SHAPES, *EXTRA_WORDS})


def tokenizer_vocab(words: tuple[str, ...] | list[str] = VOCAB_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte, every byte as a word end, whole words via merges."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge, merged = f"{left} {right}", left + right
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab()
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, pad_token=pad_token, model_max_length=77)


def _text_encoder(vocab_size: int, with_projection: bool = False, hidden: int = 32, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act=hidden_act,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks, like the real VAE: 8x downsampling, so 64 px images give 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet(down: tuple[str, ...], up: tuple[str, ...], block_out_channels: tuple[int, ...] = (32, 64), **kw):
    """A tiny UNet2DConditionModel: 8x8 latents, one layer per block, the given blocks and extras."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=block_out_channels,
                                layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=32, **kw)


def _save_sd(out: Path, text_encoder, tokenizer, unet, scheduler) -> Path:
    """Write an SD1/SD2-layout diffusers folder (one text encoder, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sd15(out: Path, block_out_channels: tuple[int, ...] = (32, 64)) -> Path:
    """A tiny SD1.5-shaped diffusers folder (UNet with cross-attention, 8x VAE, CLIP text encoder).

    Wider/deeper `block_out_channels` (e.g. (64, 128, 256) for benchmarks) keep the SD1.5 layout:
    cross-attention in every level but the lowest.
    """

    torch.manual_seed(1234)
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(len(tokenizer))
    levels = len(block_out_channels)
    unet = _unet(("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
                 ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1), block_out_channels,
                 cross_attention_dim=32, attention_head_dim=8)
    return _save_sd(out, text_encoder, tokenizer, unet, _scheduler())


def build_sd2v(out: Path) -> Path:
    """A tiny SD2.x-768-v-shaped diffusers folder: what sets SD2 apart from SD1.5, scaled down.

    Linear projections in the transformer blocks, upcast attention, an OpenCLIP-style text encoder
    (`gelu`, '!' as the pad token), a wider context than SD1.5's demo (64, as 1024 vs 768), and a
    v-prediction scheduler, so a run learns with v-prediction without being told.
    """

    torch.manual_seed(2468)
    tokenizer = build_tokenizer(pad_token="!")
    text_encoder = _text_encoder(len(tokenizer), hidden=64, hidden_act="gelu")
    unet = _unet(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    return _save_sd(out, text_encoder, tokenizer, unet, _scheduler("v_prediction"))


def build_sdxl(out: Path) -> Path:
    """A tiny SDXL-shaped diffusers folder (two text encoders, size/crop conditioning)."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(4321)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    te1 = _text_encoder(len(tokenizer), hidden=32)
    te2 = _text_encoder(len(tokenizer_2), with_projection=True, hidden=32)
    unet = _unet(
        ("DownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # te1 hidden + te2 hidden, as 768 + 1280 = 2048 in SDXL
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _draw(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], size: tuple[int, int], rng) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * (0.25 + 0.15 * rng.random())
    cx, cy = w / 2 + (rng.random() - 0.5) * w * 0.3, h / 2 + (rng.random() - 0.5) * h * 0.3
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        pts = []
        for i in range(10):
            a = np.pi / 2 + i * np.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        d.polygon(pts, fill=fg)
    return img


def build_images(out: Path, count: int = 12) -> Path:
    """kohya layout: 5_shape/ (captioned) and 2_star/ (no captions: falls back to the class words)."""
    rng = np.random.default_rng(7)
    names = list(COLORS)
    sizes = [(64, 64), (96, 64), (64, 96)]
    shape_dir = out / "5_shape"
    shape_dir.mkdir(parents=True)
    for i in range(count):
        shape = SHAPES[i % 3]
        fg, bg = names[i % len(names)], names[(i * 3 + 2) % len(names)]
        if fg == bg:
            bg = names[(i * 3 + 3) % len(names)]
        _draw(shape, COLORS[fg], COLORS[bg], sizes[i % 3], rng).save(shape_dir / f"img_{i:03d}.png")
        (shape_dir / f"img_{i:03d}.txt").write_text(f"a {fg} {shape}, {bg} background\n", encoding="utf-8")
    star_dir = out / "2_yellow star"
    star_dir.mkdir()
    for i in range(2):
        _draw("star", COLORS["yellow"], COLORS["blue" if i else "black"], (64, 64), rng).save(star_dir / f"star_{i}.png")
    return out


DEMO_VERSION = 3  # written into .complete; 2 added model-sd2v/, 3 model-sd3/ and model-flux/


def build_demo_assets(target: str | Path, with_sdxl: bool = True, with_sd2v: bool = True, with_flow: bool = True) -> Path:
    """Write model/, model.safetensors, model-sd2v/, model-sdxl/, model-sd3/, model-flux/ and images/
    under target (built aside, then moved into place). The flow-matching models (SD3.5- and
    Flux.1-shaped) come from backend/trainer/demo_flow.py."""
    target = Path(target)
    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_sd15(tmp / "model")
    if with_sd2v:
        build_sd2v(tmp / "model-sd2v")
    if with_sdxl:
        build_sdxl(tmp / "model-sdxl")
    if with_flow:
        from backend.trainer.demo_flow import build_flux, build_sd3

        build_sd3(tmp / "model-sd3")
        build_flux(tmp / "model-flux")
    build_images(tmp / "images")
    _write_single_file(tmp)
    (tmp / "README.txt").write_text(
        "Lathe demo assets (random weights; regenerate with: python -m backend demo-assets).\n", encoding="utf-8"
    )
    (tmp / ".complete").write_text(json.dumps({"version": DEMO_VERSION}) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _write_single_file(root: Path) -> None:
    """Also ship the SD1.5 demo as one LDM-layout .safetensors file, the form most users' models have."""
    try:
        from backend.trainer.single_file import save_single_file
    except ImportError:  # the converter is optional for the demo
        return
    save_single_file(root / "model", root / "model.safetensors")
