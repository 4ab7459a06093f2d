"""Single-file (LDM layout) checkpoints: offline loading, saving, family detection, shipped configs.

Tiny random SD1.5-, SD2- and SDXL-shaped models are written as one .safetensors file and loaded
back tensor for tensor; the shipped full-size configs are checked on the meta device (parameter
counts of the published models, and the LDM key layout they imply). No test may use the network.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from backend.trainer.clip_tokenizer import build_clip_tokenizer, bytes_to_unicode, load_tokenizer
from backend.trainer.single_file import (
    CONFIG_ROOT,
    components_from_ldm,
    detect_family,
    detect_file_family,
    load_single_file,
    read_checkpoint,
    save_single_file,
    to_ldm_state_dict,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py: loading never reaches the network


# ------------------------------------------------------------------------------------ tiny models
def _clip(vocab_size: int, act: str = "quick_gelu", projection: int | None = None) -> Any:
    cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab_size,
        max_position_embeddings=77, hidden_act=act, projection_dim=projection or 32,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip


def _unet(**kw: Any) -> UNet2DConditionModel:
    args: dict[str, Any] = {
        "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
    }  # fmt: skip
    return UNet2DConditionModel(**{**args, **kw})


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def _bytes_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A small non-standard vocabulary (bytes only, no merges): exercises the embedded tokenizer."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], pad_token=pad_token, model_max_length=77)


def tiny_sd15() -> dict[str, Any]:
    torch.manual_seed(0)
    tok = build_clip_tokenizer()
    return {"unet": _unet(), "vae": _vae(), "text_encoder": _clip(len(tok)), "tokenizer": tok, "scheduler": _scheduler()}


def tiny_sdxl() -> dict[str, Any]:
    torch.manual_seed(1)
    tok, tok2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    unet = _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    )  # fmt: skip
    te2 = _clip(len(tok2), act="gelu", projection=24)  # 24 != 32: the projection's transpose is checked
    return {"unet": unet, "vae": _vae(), "text_encoder": _clip(len(tok)), "text_encoder_2": te2,
            "tokenizer": tok, "tokenizer_2": tok2, "scheduler": _scheduler()}  # fmt: skip


def tiny_sd2(prediction_type: str = "epsilon") -> dict[str, Any]:
    torch.manual_seed(2)
    tok = _bytes_tokenizer(pad_token="!")
    unet = _unet(attention_head_dim=(2, 4), use_linear_projection=True)
    return {"unet": unet, "vae": _vae(), "text_encoder": _clip(len(tok), act="gelu"), "tokenizer": tok,
            "scheduler": _scheduler(prediction_type)}  # fmt: skip


def _write_folder(comps: dict[str, Any], root: Path) -> Path:
    for name, part in comps.items():
        part.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tiny_sd15(), tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tiny_sdxl(), tmp_path_factory.mktemp("sdxl"))


def _assert_same(original: dict[str, Any], loaded: dict[str, Any]) -> None:
    for name in MODELS:
        if name not in original:
            assert name not in loaded
            continue
        want, got = original[name].state_dict(), loaded[name].state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert torch.equal(tensor, got[key]), f"{name}.{key}"
    for name in ("tokenizer", "tokenizer_2"):
        if name in original:
            text = "a photo of a cat, naïve 42"
            kw = {"padding": "max_length", "max_length": 20}
            assert loaded[name](text, **kw).input_ids == original[name](text, **kw).input_ids, name


def _load_folder(root: Path) -> dict[str, Any]:
    comps: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_pretrained(root / "unet"),
        "vae": AutoencoderKL.from_pretrained(root / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
    }
    if (root / "text_encoder_2").is_dir():
        comps["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2")
        comps["tokenizer_2"] = CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    return comps


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_folder_round_trip_with_config_dir(family: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = request.getfixturevalue(f"{family}_dir")
    out = save_single_file(folder, tmp_path / "model.safetensors")
    assert detect_file_family(out) == family
    state, _ = read_checkpoint(out)
    assert detect_family(state.keys(), lambda k: tuple(state[k].shape)) == family

    loaded = load_single_file(out, None, config_dir=folder)
    assert loaded["family"] == family
    _assert_same(_load_folder(folder), loaded)
    assert isinstance(loaded["noise_scheduler"], DDPMScheduler)
    assert loaded["noise_scheduler"].config.prediction_type == "epsilon"
    assert not loaded["unet"].training


@pytest.mark.parametrize("build", [tiny_sd15, tiny_sdxl, tiny_sd2])
def test_components_round_trip_with_embedded_configs(build: Any, tmp_path: Path) -> None:
    """Saved from in-memory components; loaded from the file alone (configs ride in its metadata)."""
    comps = build()
    out = save_single_file(comps, tmp_path / "m.safetensors")
    loaded = load_single_file(out)
    _assert_same(comps, loaded)
    assert loaded["tokenizer"].pad_token == comps["tokenizer"].pad_token


def test_sd2_v_prediction_is_kept_and_dtype_applies(tmp_path: Path) -> None:
    out = save_single_file(tiny_sd2("v_prediction"), tmp_path / "v.safetensors")
    loaded = load_single_file(out, torch_dtype=torch.float16)
    assert loaded["family"] == "sd2-v"
    assert loaded["noise_scheduler"].config.prediction_type == "v_prediction"
    assert next(loaded["unet"].parameters()).dtype == torch.float16
    assert load_single_file(out, "sd2")["family"] == "sd2"  # an explicit family wins
    # A bf16 run: the parts it names in bf16 (the numbers of an fp32 load cast), the VAE in fp32.
    full = load_single_file(out)
    half = load_single_file(out, part_dtypes={"unet": torch.bfloat16, "text_encoder": torch.bfloat16})
    for part in ("unet", "text_encoder"):
        want = full[part].state_dict()
        assert all(torch.equal(half[part].state_dict()[k], v.to(torch.bfloat16)) for k, v in want.items()), part
        assert {p.dtype for p in half[part].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half["vae"].parameters()} == {torch.float32}


def test_ckpt_is_read_with_weights_only(sd15_dir: Path, tmp_path: Path) -> None:
    state, _ = read_checkpoint(save_single_file(sd15_dir, tmp_path / "m.safetensors"))
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    _assert_same(_load_folder(sd15_dir), load_single_file(ckpt, "sd15", config_dir=sd15_dir))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, unsafe)
    with pytest.raises(ValueError, match="Python objects besides tensors"):
        load_single_file(unsafe)


def test_older_clip_key_layout_and_extra_keys_are_accepted(sd15_dir: Path, tmp_path: Path) -> None:
    """Early SD1 files lack "text_model." in CLIP keys; most carry position_ids and schedule buffers."""
    state, _ = read_checkpoint(save_single_file(sd15_dir, tmp_path / "m.safetensors"))
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    old["alphas_cumprod"] = torch.ones(1000)
    save_file(old, str(tmp_path / "old.safetensors"))
    _assert_same(_load_folder(sd15_dir), load_single_file(tmp_path / "old.safetensors", config_dir=sd15_dir))


# ------------------------------------------------------------------------------------ refusals
def test_family_mismatch_and_unknown_family(sd15_dir: Path, tmp_path: Path) -> None:
    out = save_single_file(sd15_dir, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="set to sdxl, but m.safetensors looks like sd15"):
        load_single_file(out, "sdxl")
    with pytest.raises(ValueError, match="Unknown model family"):
        load_single_file(out, "sd3")


def test_weights_that_do_not_fit_the_shipped_configs(sd15_dir: Path, tmp_path: Path) -> None:
    state, _ = read_checkpoint(save_single_file(sd15_dir, tmp_path / "m.safetensors"))
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))  # no embedded configs: the full-size SD1.5 configs apply
    with pytest.raises(ValueError, match="UNet weights do not fit its configuration: .* of another shape"):
        load_single_file(bare)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_x.alpha"], "LoRA"),
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "Stable Diffusion 3"),
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "Flux"),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "standalone VAE"),
        (["emb_params"], "textual-inversion"),
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "without its UNet"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "no text encoder"),
    ],
)
def test_unrecognised_files_are_refused(keys: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({k: torch.zeros(2, 4, 3, 3) for k in keys}, str(path))
    with pytest.raises(ValueError, match=message):
        load_single_file(path)


def test_inpainting_refiner_and_garbage_are_refused(tmp_path: Path) -> None:
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(ValueError, match="9 input channels"):
        detect_family([conv_in, "cond_stage_model.transformer.x"], lambda k: (320, 9, 3, 3))
    refiner = [conv_in, "conditioner.embedders.0.model.text_projection", "first_stage_model.x"]
    with pytest.raises(ValueError, match="SDXL refiner"):
        detect_family(refiner, lambda k: (384, 4, 3, 3))
    for name in ("junk.safetensors", "junk.ckpt"):
        (tmp_path / name).write_bytes(b"this is not a checkpoint " * 20)
        with pytest.raises(ValueError, match="is not a readable"):
            load_single_file(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_single_file(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------ shipped configs
def _meta_components(family: str) -> dict[str, Any]:
    root = CONFIG_ROOT / family
    with init_empty_weights():
        comps = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        }
        if family == "sdxl":
            cfg2 = CLIPTextConfig.from_pretrained(root / "text_encoder_2")
            comps["text_encoder_2"] = CLIPTextModelWithProjection(cfg2)
    return comps


PARAMS = {  # the published models' parameter counts
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
REAL_KEYS = {  # keys (and shapes) of the real single-file checkpoints
    "sd15": {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
             "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
             "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024)},
    "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}  # fmt: skip
EXTRA_KEYS = {  # present in real files, ignored by the loader
    "sd15": {"cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77), "alphas_cumprod": (1000,)},
    "sd2": {"cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.text_projection": (1024, 1024), "cond_stage_model.model.logit_scale": ()},
    "sdxl": {"conditioner.embedders.1.model.logit_scale": (), "model_ema.decay": ()},
}  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sd2", "sd2-v", "sdxl"])
def test_shipped_configs_match_the_published_models(family: str) -> None:
    comps = _meta_components(family)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in comps.items()}
    assert counts == PARAMS[family]

    base = "sd2" if family == "sd2-v" else family
    state = to_ldm_state_dict(comps, family)
    for key, shape in REAL_KEYS[base].items():
        assert tuple(state[key].shape) == shape, key
    state.update({k: torch.empty(s, device="meta") for k, s in EXTRA_KEYS[base].items()})
    assert detect_family(state.keys(), lambda k: tuple(state[k].shape)) == base
    loaded = components_from_ldm(state, family, CONFIG_ROOT / family)  # strict: every weight placed
    assert loaded["noise_scheduler"].config.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert ("tokenizer_2" in loaded) == (family == "sdxl")


def test_clip_tokenizer_is_built_offline() -> None:
    tok = load_tokenizer(CONFIG_ROOT / "sd15" / "tokenizer")
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert (len(tok), tok.model_max_length, tok.pad_token_id) == (49408, 77, 49407)
    for family, name in (("sd2", "tokenizer"), ("sdxl", "tokenizer_2")):
        open_clip = load_tokenizer(CONFIG_ROOT / family / name)
        padded = open_clip("a photo of a cat", padding="max_length", max_length=9).input_ids
        assert (open_clip.pad_token, padded) == ("!", [*CAT_IDS, 0, 0])
    assert load_tokenizer(CONFIG_ROOT / "sdxl" / "tokenizer").pad_token == "<|endoftext|>"
