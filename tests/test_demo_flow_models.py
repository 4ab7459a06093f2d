"""The flow-matching demo models (demo/model-sd3, demo/model-flux): SD3.5- and Flux.1-dev-shaped,
loadable by their diffusers pipelines offline, able to generate and to take a gradient step on the
CPU, and built byte for byte the same each time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from backend.trainer.demo_flow import FLUX_VAE, SD3_VAE, build_flux, build_sd3

CAPTION = "a red circle, blue background"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _load(demo: Path, name: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if name == "model-sd3" else FluxPipeline
    pipe = cls.from_pretrained(demo / name, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kw):
    import numpy as np
    import torch

    images = pipe(CAPTION, num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np",
                  generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0
    return images


def test_demo_assets_include_the_flow_models(demo: Path):
    assert json.loads((demo / ".complete").read_text())["version"] >= 3
    for name in ("model-sd3", "model-flux"):
        size = sum(p.stat().st_size for p in (demo / name).rglob("*") if p.is_file())
        assert size < 4_000_000, (name, size)


def test_sd3_loads_offline_generates_and_is_sd35_shaped(demo: Path, offline):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    pipe = _load(demo, "model-sd3")
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_3, T5TokenizerFast)
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")

    t, v = pipe.transformer.config, pipe.vae.config
    assert (v.latent_channels, t.in_channels, t.out_channels) == (16, 16, 16)
    assert (v.scaling_factor, v.shift_factor) == (SD3_VAE["scaling_factor"], SD3_VAE["shift_factor"])
    assert not v.use_quant_conv and not v.use_post_quant_conv
    assert t.qk_norm == "rms_norm" and list(t.dual_attention_layers) == [0]  # SD3.5 medium's extras
    clip_l, clip_g = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model > clip_l + clip_g  # CLIP is zero-padded
    assert t.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting) == (3.0, False)

    _generate(pipe, guidance_scale=2.0)


def test_flux_loads_offline_generates_and_is_flux_dev_shaped(demo: Path, offline):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    pipe = _load(demo, "model-flux")
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert type(pipe.text_encoder) is CLIPTextModel and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, T5TokenizerFast)

    t, v = pipe.transformer.config, pipe.vae.config
    assert v.latent_channels == 16 and t.in_channels == 16 * 2 * 2  # 2x2-packed latents
    assert (v.scaling_factor, v.shift_factor) == (FLUX_VAE["scaling_factor"], FLUX_VAE["shift_factor"])
    assert t.guidance_embeds and sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting, s.base_shift, s.max_shift) == (3.0, True, 0.5, 1.15)
    assert (s.base_image_seq_len, s.max_image_seq_len) == (256, 4096)

    _generate(pipe, guidance_scale=3.5)


@pytest.mark.parametrize("name", ["model-sd3", "model-flux"])
def test_t5_tokenizer_round_trips_a_demo_caption_offline(demo: Path, offline, name: str):
    from transformers import T5TokenizerFast

    sub = "tokenizer_3" if name == "model-sd3" else "tokenizer_2"
    tok = T5TokenizerFast.from_pretrained(str(demo / name / sub), local_files_only=True)
    ids = tok(CAPTION).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", ",", "▁blue", "▁background", "</s>"]
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    padded = tok(CAPTION, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded) == 32 and padded[len(ids):] == [tok.pad_token_id] * (32 - len(ids)) and tok.pad_token_id == 0
    assert tok("an unknown zebra").input_ids[-1] == 1  # unseen words fall back to characters, not an error


@pytest.mark.parametrize("name", ["model-sd3", "model-flux"])
def test_the_transformer_takes_a_flow_matching_step_on_the_cpu(demo: Path, offline, name: str):
    """A rectified-flow loss (velocity = noise - latents) backpropagates into every block."""
    import torch

    pipe = _load(demo, name)
    torch.manual_seed(0)
    model = pipe.transformer.train()
    latents, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    sigma = torch.tensor([0.7])
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        if name == "model-sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(CAPTION, CAPTION, CAPTION, do_classifier_free_guidance=False,
                                                      max_sequence_length=32)
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(CAPTION, CAPTION, max_sequence_length=32)
    if name == "model-sd3":
        pred = model(hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=sigma * 1000, return_dict=False)[0]
    else:
        packed = pipe._pack_latents(noisy, 1, 16, 8, 8)
        image_ids = pipe._prepare_latent_image_ids(1, 4, 4, noisy.device, noisy.dtype)
        pred = model(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma,
                     guidance=torch.tensor([3.5]), txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        pred = pipe._unpack_latents(pred, 64, 64, pipe.vae_scale_factor)
    loss = torch.nn.functional.mse_loss(pred, noise - latents)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize(("name", "build"), [("model-sd3", build_sd3), ("model-flux", build_flux)])
def test_flow_models_are_built_byte_for_byte_the_same(demo: Path, tmp_path: Path, name: str, build):
    assert _digest(build(tmp_path / name)) == _digest(demo / name)
