"""SDXL UNet module names: diffusers <-> the original Stability ("LDM"/sgm) names sd-scripts uses.

sd-scripts (kohya) trains SDXL on its own copy of Stability's UNet (library/sdxl_original_unet.py,
`SdxlUNet2DConditionModel`), so its LoRA/LyCORIS keys are `lora_unet_<LDM module path with _>`
(networks/lora.py, `LoRANetwork.create_modules`: `prefix + "." + name + "." + child_name` with
"." -> "_"), e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. Lathe's modules
carry diffusers names (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). This module
is the pure-string translation between the two (no torch), driven by the UNet's config dict (as in
a diffusers `unet/config.json`: `down_block_types`, `up_block_types`, `layers_per_block`).

Where the rules come from:
  * sd-scripts library/sdxl_model_util.py, `make_unet_conversion_map` (used by
    `convert_diffusers_unet_state_dict_to_sdxl`, and by networks/lora.py
    `convert_diffusers_to_sai_if_needed` / networks/lora_diffusers.py `UNET_CONVERSION_MAP` for LoRA
    keys): the block prefixes, with L = layers_per_block (2 in SDXL):
      down_blocks.i.resnets.j / attentions.j -> input_blocks.{i*(L+1)+j+1}.0 / .1
      down_blocks.i.downsamplers.0.conv      -> input_blocks.{(i+1)*(L+1)}.0.op
      up_blocks.i.resnets.j / attentions.j   -> output_blocks.{i*(L+1)+j}.0 / .1   (L+1 layers)
      up_blocks.i.upsamplers.0               -> output_blocks.{i*(L+1)+L}.2  ("change for sdxl":
          the upsampler follows the attention; in an up block without attentions it is slot .1,
          as in sd-scripts library/model_util.py `convert_unet_state_dict_to_sd`'s SD1 map
          `{1 if i == 0 else 2}` and in sdxl_original_unet.py, which appends Upsample2D after
          the ResBlock [and attention])
      mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
      time_embedding.linear_1/2 -> time_embed.0/.2, add_embedding.linear_1/2 -> label_emb.0.0/.2,
      conv_in -> input_blocks.0.0, conv_norm_out -> out.0, conv_out -> out.2
    and inside a ResNet block (`unet_conversion_map_resnet`): norm1 -> in_layers.0,
    conv1 -> in_layers.2, norm2 -> out_layers.0, conv2 -> out_layers.3,
    time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection.
    Inside attention blocks the names agree (norm, proj_in, transformer_blocks.N.attn1/attn2.to_q/
    to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_out, norm1-3), as in sdxl_original_unet.py.
  * sd-scripts hardcodes 3 levels and L = 2; the indices here follow the sgm UNet's construction
    (sdxl_original_unet.py / sgm openaimodel.py: input_blocks[0] is conv_in, then per level its
    layers and a downsampler except on the last level; output_blocks per level L+1 layers, the
    upsampler inside the last one except on the last level), which is also how diffusers reads
    them back: diffusers/loaders/lora_conversion_utils.py `_maybe_map_sgm_blocks_to_diffusers`
    (block_id = (n-1)//(L+1), layer = (n-1)%(L+1) for input blocks; n//(L+1), n%(L+1) for output
    blocks) followed by `_convert_non_diffusers_lora_to_diffusers` / `_convert_unet_lora_key`,
    which is what `StableDiffusionXLPipeline.load_lora_weights` runs on sd-scripts files.
    A per-level `layers_per_block` list is accepted (cumulative indices, up blocks reversed, as
    diffusers builds them); diffusers' own reader only handles an int there.
  * Checked once against sd-scripts' SdxlUNet2DConditionModel (commit 48d368f): the 794
    Linear/Conv2d modules of diffusers' SDXL UNet map one-to-one onto its 794 Linear/Conv2d
    module names, with equal weight shapes (tests/test_sdxl_names.py pins a digest of that list).

Writing a file: use one naming for every UNet key. diffusers' `_maybe_map_sgm_blocks_to_diffusers`
drops all input_blocks/middle_block/output_blocks keys when any down_blocks/mid_block/up_blocks
key is present in the same file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

KOHYA_UNET_PREFIX = "lora_unet_"

# diffusers ResnetBlock2D child -> LDM ResBlock child (sd-scripts `unet_conversion_map_resnet`)
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_RESNET_INV = {v: k for k, v in _RESNET.items()}

def _config_key(unet_config: Mapping[str, Any]) -> tuple:
    try:
        down = tuple(unet_config["down_block_types"])
        up = tuple(unet_config["up_block_types"])
        per = unet_config["layers_per_block"]
    except KeyError as e:
        raise ValueError(f"The UNet config has no {e.args[0]!r}") from None
    per = (int(per),) * len(down) if isinstance(per, int) else tuple(int(x) for x in per)
    if len(per) != len(down) or len(up) != len(down):
        raise ValueError("The UNet config's down_block_types, up_block_types and layers_per_block disagree")
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return down, up, per, mid


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


@lru_cache(maxsize=32)
def _layout(key: tuple) -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]]]:
    """{diffusers prefix: (LDM prefix, is_resnet)} and its inverse. The rest of a name after the
    prefix is carried over unchanged, except inside ResNet blocks (renamed by _RESNET)."""
    down, up, per, mid = key
    rows: list[tuple[str, str, bool]] = [
        ("conv_in", "input_blocks.0.0", False),
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("add_embedding.linear_1", "label_emb.0.0", False),
        ("add_embedding.linear_2", "label_emb.0.2", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
    ]
    n = 1  # input_blocks[0] is conv_in
    for i, block_type in enumerate(down):
        for j in range(per[i]):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", True))
            if _has_attention(block_type):
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", False))
            n += 1
        if i < len(down) - 1:  # diffusers: add_downsample = not is_final_block
            rows.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{n}.0", False))
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", False))
            n += 1
    if mid:
        rows.append(("mid_block.resnets.0", "middle_block.0", True))
        if _has_attention(mid):
            rows.append(("mid_block.attentions.0", "middle_block.1", False))
        rows.append(("mid_block.resnets.1", "middle_block.2", True))
    n = 0
    reversed_per = per[::-1]
    for i, block_type in enumerate(up):
        attn = _has_attention(block_type)
        for j in range(reversed_per[i] + 1):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", False))
            n += 1
        if i < len(up) - 1:  # the upsampler sits in the block's last layer, after the attention
            rows.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{n - 1}.{2 if attn else 1}", False))
    forward = {hf: (sd, res) for hf, sd, res in rows}
    inverse = {sd: (hf, res) for hf, sd, res in rows}
    assert len(forward) == len(inverse) == len(rows)
    return forward, inverse


def _split(name: str, table: Mapping[str, tuple[str, bool]], what: str) -> tuple[str, str, bool]:
    """The longest dotted head of `name` in `table`: (mapped head, rest, is_resnet)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in table:
            mapped, res = table[head]
            return mapped, ".".join(parts[k:]), res
    raise ValueError(f"{name!r} is not a {what} SDXL UNet module name for this UNet config")


def ldm_module_name(diffusers_name: str, unet_config: Mapping[str, Any]) -> str:
    """A diffusers UNet module path (dotted) -> the LDM (sgm / sd-scripts) module path (dotted).

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q` on the SDXL config. Raises ValueError for a
    name that has no LDM counterpart (wrong index for this config, unknown ResNet child).
    """
    return _ldm_name(diffusers_name, _config_key(unet_config))


def _ldm_name(diffusers_name: str, key: tuple) -> str:
    forward, _ = _layout(key)
    head, rest, res = _split(diffusers_name, forward, "diffusers")
    if res and rest:
        child, _, tail = rest.partition(".")
        if child not in _RESNET:
            raise ValueError(f"{diffusers_name!r}: no LDM name for the ResNet block's {child!r}")
        rest = _RESNET[child] + ("." + tail if tail else "")
    return f"{head}.{rest}" if rest else head


def diffusers_module_name(ldm_name: str, unet_config: Mapping[str, Any]) -> str:
    """The inverse of ldm_module_name: an LDM UNet module path (dotted) -> the diffusers one."""
    _, inverse = _layout(_config_key(unet_config))
    head, rest, res = _split(ldm_name, inverse, "LDM")
    if res and rest:
        parts = rest.split(".")
        child = next((c for c in (".".join(parts[:2]), parts[0]) if c in _RESNET_INV), None)
        if child is None:
            raise ValueError(f"{ldm_name!r}: the ResNet block's {rest!r} has no diffusers counterpart")
        tail = rest[len(child) + 1 :]
        rest = _RESNET_INV[child] + ("." + tail if tail else "")
    return f"{head}.{rest}" if rest else head


def kohya_stem(module_path: str) -> str:
    """`lora_unet_` + the dotted module path with "." -> "_" (sd-scripts' LoRA module naming)."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def ldm_kohya_prefix_map(diffusers_module_names: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Each diffusers module path -> its sd-scripts key stem `lora_unet_<LDM path with _>`.

    Raises ValueError when a name has no LDM counterpart or two names would share a stem.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in diffusers_module_names:
        stem = kohya_stem(ldm_module_name(name, unet_config))
        if seen.setdefault(stem, name) != name:
            raise ValueError(f"{name!r} and {seen[stem]!r} would both be written as {stem!r}")
        out[name] = stem
    return out


@lru_cache(maxsize=8)
def _stem_lookup(names: tuple[str, ...], key: tuple) -> dict[str, str]:
    out: dict[str, str] = {}

    def add(stem: str, name: str) -> None:
        if out.setdefault(stem, name) != name:
            raise ValueError(f"The kohya stem {stem!r} fits both {name!r} and {out[stem]!r}")

    for name in names:
        add(kohya_stem(name), name)  # diffusers-style stem (sd-scripts' SD1/SD2 naming, older files)
        try:
            ldm = _ldm_name(name, key)
        except ValueError:
            continue  # not a UNet module of this config: only its diffusers-style stem
        add(kohya_stem(ldm), name)
    return out


def kohya_stem_lookup(diffusers_module_names: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Every kohya stem (LDM-style and diffusers-style) of the given modules -> the diffusers path."""
    return dict(_stem_lookup(tuple(diffusers_module_names), _config_key(unet_config)))


def diffusers_from_kohya_stem(
    stem: str, unet_config: Mapping[str, Any], diffusers_module_names: Iterable[str]
) -> str | None:
    """A kohya UNet key stem in either naming -> the diffusers module path, None if no module fits.

    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (sd-scripts SDXL) and
    `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q` (diffusers-style) both
    give `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. "_" is ambiguous
    (`transformer_blocks`, `to_q`), so the stem is matched against the stems of the known modules
    rather than parsed.
    """
    if not stem.startswith(KOHYA_UNET_PREFIX):
        return None
    return _stem_lookup(tuple(diffusers_module_names), _config_key(unet_config)).get(stem)
