"""backend.sdxl_names: diffusers <-> LDM (sd-scripts) SDXL UNet module names, and diffusers' reader."""

from __future__ import annotations

import hashlib

import pytest
import torch

from backend.sdxl_names import (
    diffusers_from_kohya_stem,
    diffusers_module_name,
    kohya_stem_lookup,
    ldm_kohya_prefix_map,
    ldm_module_name,
)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the naming-relevant values and what is
# needed to build the UNet's module tree)
SDXL = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}

# sha256 of "\n".join(sorted(...)) of the Linear/Conv2d module names of sd-scripts'
# library/sdxl_original_unet.py SdxlUNet2DConditionModel (kohya-ss/sd-scripts 48d368f, built on the
# meta device): the names sd-scripts' SDXL LoRA keys are made of.
SD_SCRIPTS_SDXL_LINEAR_CONV_DIGEST = "841b41ba4518e6a39dc083b7c88d9b5d955f5e26f8c914692a8bdc09234aee61"
SD_SCRIPTS_SDXL_LINEAR_CONV_COUNT = 794

# (diffusers, LDM) pairs from sd-scripts' make_unet_conversion_map / real sd-scripts SDXL LoRA keys
KNOWN = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0",
     "input_blocks.5.1.transformer_blocks.1.attn2.to_out.0"),
    ("down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2", "input_blocks.7.1.transformer_blocks.9.ff.net.2"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.0.attentions.0.transformer_blocks.5.attn2.to_k", "output_blocks.0.1.transformer_blocks.5.attn2.to_k"),
    ("up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
     "output_blocks.3.1.transformer_blocks.1.ff.net.0.proj"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v", "output_blocks.5.1.transformer_blocks.0.attn1.to_v"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.attentions.0.transformer_blocks.9.attn2.to_q", "middle_block.1.transformer_blocks.9.attn2.to_q"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.2.resnets.1.conv2", "input_blocks.8.0.out_layers.3"),
    ("up_blocks.0.resnets.0.norm2", "output_blocks.0.0.out_layers.0"),
    ("up_blocks.2.resnets.0.norm1", "output_blocks.6.0.in_layers.0"),
    ("up_blocks.2.resnets.2.time_emb_proj", "output_blocks.8.0.emb_layers.1"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
]


@pytest.mark.parametrize(("hf", "ldm"), KNOWN)
def test_known_sdxl_pairs(hf: str, ldm: str) -> None:
    assert ldm_module_name(hf, SDXL) == ldm
    assert diffusers_module_name(ldm, SDXL) == hf


def test_kohya_stems_as_sd_scripts_writes_them() -> None:
    names = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.proj_in",
        "up_blocks.0.upsamplers.0.conv",
        "down_blocks.0.resnets.0.conv1",
    ]
    assert ldm_kohya_prefix_map(names, SDXL) == {
        names[0]: "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        names[1]: "lora_unet_middle_block_1_proj_in",
        names[2]: "lora_unet_output_blocks_2_2_conv",
        names[3]: "lora_unet_input_blocks_1_0_in_layers_2",
    }


@pytest.mark.parametrize(
    "name",
    [
        "down_blocks.0.attentions.0.proj_in",  # DownBlock2D: no attentions
        "down_blocks.2.downsamplers.0.conv",  # the last level has no downsampler
        "up_blocks.2.upsamplers.0.conv",  # nor upsampler
        "down_blocks.0.resnets.2.conv1",  # layers_per_block is 2
        "up_blocks.2.attentions.0.proj_in",  # UpBlock2D
        "down_blocks.3.resnets.0.conv1",  # 3 levels
        "down_blocks.0.resnets.0.nonlinearity",
        "text_model.encoder.layers.0.mlp.fc1",
    ],
)
def test_names_without_an_ldm_counterpart_raise(name: str) -> None:
    with pytest.raises(ValueError):
        ldm_module_name(name, SDXL)


@pytest.mark.parametrize(
    "name", ["input_blocks.9.0.in_layers.2", "input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.1",
             "output_blocks.9.0.in_layers.2", "middle_block.3.in_layers.2", "out.1"]
)
def test_ldm_names_without_a_diffusers_counterpart_raise(name: str) -> None:
    with pytest.raises(ValueError):
        diffusers_module_name(name, SDXL)


def test_index_rules_follow_layers_per_block() -> None:
    """SD1.5's layout (4 levels, up_blocks.0 without attentions), as sd-scripts' library/model_util.py
    convert_unet_state_dict_to_sd maps it, and a layers_per_block of 1 (the demo UNet)."""
    sd15 = {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
    }
    assert ldm_module_name("up_blocks.0.upsamplers.0.conv", sd15) == "output_blocks.2.1.conv"
    assert ldm_module_name("up_blocks.1.upsamplers.0.conv", sd15) == "output_blocks.5.2.conv"
    assert ldm_module_name("down_blocks.3.resnets.1.conv2", sd15) == "input_blocks.11.0.out_layers.3"
    assert ldm_module_name("down_blocks.2.downsamplers.0.conv", sd15) == "input_blocks.9.0.op"
    assert ldm_module_name("up_blocks.3.attentions.2.proj_out", sd15) == "output_blocks.11.1.proj_out"
    assert diffusers_module_name("output_blocks.2.1.conv", sd15) == "up_blocks.0.upsamplers.0.conv"
    one = {**SDXL, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1}
    assert ldm_module_name("down_blocks.0.downsamplers.0.conv", one) == "input_blocks.2.0.op"
    assert ldm_module_name("down_blocks.1.attentions.0.proj_in", one) == "input_blocks.3.1.proj_in"
    assert ldm_module_name("up_blocks.0.attentions.1.proj_in", one) == "output_blocks.1.1.proj_in"
    assert ldm_module_name("up_blocks.0.upsamplers.0.conv", one) == "output_blocks.1.2.conv"
    assert ldm_module_name("up_blocks.1.resnets.1.conv1", one) == "output_blocks.3.0.in_layers.2"
    # a per-level list: cumulative indices, the up blocks in reverse
    mixed = {**one, "layers_per_block": [1, 2]}
    assert ldm_module_name("down_blocks.1.resnets.1.conv1", mixed) == "input_blocks.4.0.in_layers.2"
    assert ldm_module_name("up_blocks.0.upsamplers.0.conv", mixed) == "output_blocks.2.2.conv"
    assert ldm_module_name("up_blocks.1.resnets.0.conv1", mixed) == "output_blocks.3.0.in_layers.2"


def _linear_conv(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.fixture(scope="module")
def sdxl_unet() -> torch.nn.Module:
    """The full-size SDXL base UNet's module tree, without weights (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**SDXL)


@pytest.fixture(scope="module")
def demo_unet(demo):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(demo / "model-sdxl" / "unet", local_files_only=True)


def _round_trip(names: list[str], config: dict) -> dict[str, str]:
    stems = ldm_kohya_prefix_map(names, config)
    ldm = [ldm_module_name(n, config) for n in names]
    assert len(set(ldm)) == len(names)
    assert len(set(stems.values())) == len(names)
    for name, path in zip(names, ldm, strict=True):
        assert diffusers_module_name(path, config) == name
        assert stems[name] == "lora_unet_" + path.replace(".", "_")
        assert diffusers_from_kohya_stem(stems[name], config, names) == name  # LDM-style stem
        assert diffusers_from_kohya_stem("lora_unet_" + name.replace(".", "_"), config, names) == name
    return stems


def test_full_sdxl_unet_matches_sd_scripts_module_names(sdxl_unet) -> None:
    names = list(_linear_conv(sdxl_unet))
    _round_trip(names, dict(sdxl_unet.config))
    ldm = sorted(ldm_module_name(n, SDXL) for n in names)
    assert len(ldm) == SD_SCRIPTS_SDXL_LINEAR_CONV_COUNT
    assert hashlib.sha256("\n".join(ldm).encode()).hexdigest() == SD_SCRIPTS_SDXL_LINEAR_CONV_DIGEST


def test_demo_sdxl_unet_round_trip(demo_unet) -> None:
    names = list(_linear_conv(demo_unet))
    assert len(names) > 50
    _round_trip(names, dict(demo_unet.config))


def test_diffusers_from_kohya_stem_rejects_unknown() -> None:
    names = ["down_blocks.1.attentions.0.proj_in", "conv_in"]
    assert diffusers_from_kohya_stem("lora_unet_input_blocks_0_0", SDXL, names) == "conv_in"
    assert diffusers_from_kohya_stem("lora_unet_input_blocks_4_1_proj_in", SDXL, names) == names[0]
    assert diffusers_from_kohya_stem("lora_unet_input_blocks_5_1_proj_in", SDXL, names) is None
    assert diffusers_from_kohya_stem("lora_te1_text_model_encoder_layers_0_mlp_fc1", SDXL, names) is None
    assert diffusers_from_kohya_stem("lora_unet_input_blocks_4_1_proj_in_x", SDXL, names) is None
    lookup = kohya_stem_lookup(names, SDXL)
    assert lookup == {
        "lora_unet_down_blocks_1_attentions_0_proj_in": names[0],
        "lora_unet_input_blocks_4_1_proj_in": names[0],
        "lora_unet_conv_in": "conv_in",
        "lora_unet_input_blocks_0_0": "conv_in",
    }


# --- diffusers' own reader of sd-scripts SDXL files ------------------------------------------------


def _kohya_state_dict(modules: dict[str, torch.nn.Module], config: dict, rank: int = 2) -> dict[str, torch.Tensor]:
    sd = {}
    for name, stem in ldm_kohya_prefix_map(modules, config).items():
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            down, up = torch.zeros(rank, m.in_features), torch.zeros(m.out_features, rank)
        else:
            down, up = torch.zeros(rank, m.in_channels, *m.kernel_size), torch.zeros(m.out_channels, rank, 1, 1)
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    return sd


def _diffusers_reads(state_dict: dict, unet_config) -> tuple[set[str], dict]:
    """The UNet module names diffusers' SDXL loader makes of a kohya state dict, and its alphas:
    StableDiffusionXLPipeline.lora_state_dict (sgm block remap + _convert_non_diffusers_lora_to_diffusers),
    then the peft key conversion UNet2DConditionModel.load_lora_adapter applies."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state_dict), unet_config=unet_config)
    assert all(k.startswith("unet.") for k in converted)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft)
    return {k.rsplit(".lora_", 1)[0] for k in peft}, alphas


def test_diffusers_converter_reads_a_few_sdxl_modules() -> None:
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    picked = [hf for hf, _ in KNOWN if "norm" not in hf]  # LoRA targets Linear/Conv2d, not GroupNorm
    sd = {}
    for name, stem in ldm_kohya_prefix_map(picked, SDXL).items():
        assert stem.startswith("lora_unet_") and "down_blocks" not in stem and "up_blocks" not in stem, name
        sd[f"{stem}.lora_down.weight"] = torch.zeros(1, 1)
        sd[f"{stem}.lora_up.weight"] = torch.zeros(1, 1)
        sd[f"{stem}.alpha"] = torch.tensor(1.0)
    got, alphas = _diffusers_reads(sd, FrozenDict(SDXL))
    assert got == set(picked)
    # one alpha per module; diffusers names those of attention projections oddly
    # (`...attn1.processor.to_q_lora.down.weight.alpha`, which peft's alpha_pattern then ignores:
    # they get the file's most common alpha), the others `unet.<module>.alpha`
    assert len(alphas) == len(picked)
    plain = [n for n in picked if ".attn" not in n]
    assert {f"unet.{n}.alpha" for n in plain} <= set(alphas)
    # the two steps called directly, as the SDXL loader runs them
    remapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), FrozenDict(SDXL))
    direct, _ = _convert_non_diffusers_lora_to_diffusers(remapped)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in direct
    assert "unet.up_blocks.0.upsamplers.0.conv.lora.down.weight" in direct
    assert "unet.down_blocks.0.downsamplers.0.conv.lora.down.weight" in direct
    assert "unet.mid_block.resnets.1.time_emb_proj.lora.down.weight" in direct
    assert "unet.down_blocks.1.resnets.0.conv_shortcut.lora.down.weight" in direct


def test_diffusers_converter_reads_every_full_sdxl_module(sdxl_unet) -> None:
    modules = _linear_conv(sdxl_unet)
    sd = {}
    for stem in ldm_kohya_prefix_map(modules, SDXL).values():
        sd[f"{stem}.lora_down.weight"] = sd[f"{stem}.lora_up.weight"] = torch.zeros(1)
    got, _ = _diffusers_reads(sd, sdxl_unet.config)
    assert got == set(modules)


def test_diffusers_loads_the_demo_unet_file_into_every_module(demo) -> None:
    """Written with LDM stems, read by diffusers' SDXL loader and injected with peft: every
    Linear/Conv2d module gets exactly its own adapter (shapes must fit, or peft refuses)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(demo / "model-sdxl" / "unet", local_files_only=True)
    modules = _linear_conv(unet)
    state_dict = _kohya_state_dict(modules, dict(unet.config))
    got, _ = _diffusers_reads(state_dict, unet.config)
    assert got == set(modules)

    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state_dict), unet_config=unet.config)
    unet.load_lora_adapter(converted, network_alphas=alphas, prefix="unet", adapter_name="lathe")
    wrapped = {n for n, m in unet.named_modules() if "lathe" in getattr(m, "lora_A", {})}
    assert wrapped == set(modules)
