"""SD3/SD3.5 and Flux.1 from single files (backend/trainer/single_file_flow.py), offline.

The tiny demo folders (demo/model-flux, demo/model-sd3) are written out in the layouts users download:
the Flux.1 transformer in Black Forest Labs' layout (fused qkv, fused linear1), CLIP-L/T5 as
transformers-layout files, the VAE in its original ("ae") layout; SD3 as one checkpoint with
`text_encoders.*` and `first_stage_model.*`. Their configs ride in the file's metadata (the tiny
shapes are not the shipped ones); the shipped full-size configs are checked on the meta device
against the published models' sizes. Loading must give every tensor of the folder's components."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from backend.config import validate_config
from backend.model_family import detect_family, keys_family
from backend.trainer.model_configs.ldm_layout import vae_to_ldm
from backend.trainer.models import ModelLoadError, _load_flow_folder, load_components
from backend.trainer.single_file import META_CONFIGS
from backend.trainer.single_file_flow import (
    CONFIG_FILES,
    CONFIG_ROOT,
    T5_TOKENIZER,
    _transformer,
    flow_variant,
)
from tests.conftest import ROOT, events, run_cli, write_config

pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py: loading never reaches the network


# ------------------------------------------------------------------------------------ the layouts users have
def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) halves <-> the originals' (shift, scale): its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class _Writer:
    """Moves diffusers tensors to original names; at the end every diffusers tensor must be used."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd, self.out = dict(sd), {}

    def put(self, orig: str, *parts: str, swap: bool = False, kinds: tuple[str, ...] = ("weight", "bias")) -> None:
        for kind in kinds:
            if f"{parts[0]}.{kind}" in self.sd:
                t = torch.cat([self.sd.pop(f"{p}.{kind}") for p in parts])
                self.out[f"{orig}.{kind}"] = _swap(t) if swap else t

    def rename(self, orig: str, new: str) -> None:
        self.out[orig] = self.sd.pop(new)

    def done(self) -> dict[str, torch.Tensor]:
        assert not self.sd, f"not written: {sorted(self.sd)[:5]}"
        return self.out


def flux_to_bfl(sd: dict[str, torch.Tensor], layers: int, singles: int) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict in Black Forest Labs' layout (flux1-dev.safetensors)."""
    w = _Writer(sd)
    for orig, new in (("time_in.in_layer", "timestep_embedder.linear_1"), ("time_in.out_layer", "timestep_embedder.linear_2"),
                      ("vector_in.in_layer", "text_embedder.linear_1"), ("vector_in.out_layer", "text_embedder.linear_2"),
                      ("guidance_in.in_layer", "guidance_embedder.linear_1"),
                      ("guidance_in.out_layer", "guidance_embedder.linear_2")):
        w.put(orig, f"time_text_embed.{new}")
    w.put("txt_in", "context_embedder")
    w.put("img_in", "x_embedder")
    for i in range(layers):
        o, n = f"double_blocks.{i}", f"transformer_blocks.{i}"
        w.put(f"{o}.img_mod.lin", f"{n}.norm1.linear")
        w.put(f"{o}.txt_mod.lin", f"{n}.norm1_context.linear")
        w.put(f"{o}.img_attn.qkv", *(f"{n}.attn.to_{p}" for p in "qkv"))
        w.put(f"{o}.txt_attn.qkv", *(f"{n}.attn.add_{p}_proj" for p in "qkv"))
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            w.rename(f"{o}.{side}_attn.norm.query_norm.scale", f"{n}.attn.{q}.weight")
            w.rename(f"{o}.{side}_attn.norm.key_norm.scale", f"{n}.attn.{k}.weight")
        for side, ff in (("img", "ff"), ("txt", "ff_context")):
            w.put(f"{o}.{side}_mlp.0", f"{n}.{ff}.net.0.proj")
            w.put(f"{o}.{side}_mlp.2", f"{n}.{ff}.net.2")
        w.put(f"{o}.img_attn.proj", f"{n}.attn.to_out.0")
        w.put(f"{o}.txt_attn.proj", f"{n}.attn.to_add_out")
    for i in range(singles):
        o, n = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        w.put(f"{o}.modulation.lin", f"{n}.norm.linear")
        w.put(f"{o}.linear1", f"{n}.attn.to_q", f"{n}.attn.to_k", f"{n}.attn.to_v", f"{n}.proj_mlp")
        w.rename(f"{o}.norm.query_norm.scale", f"{n}.attn.norm_q.weight")
        w.rename(f"{o}.norm.key_norm.scale", f"{n}.attn.norm_k.weight")
        w.put(f"{o}.linear2", f"{n}.proj_out")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return w.done()


def sd3_to_original(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel's state dict in Stability's layout (sd3.5_medium.safetensors, unprefixed)."""
    w = _Writer(sd)
    w.rename("pos_embed", "pos_embed.pos_embed")
    w.put("x_embedder.proj", "pos_embed.proj")
    for orig, new in (("t_embedder.mlp.0", "timestep_embedder.linear_1"), ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
                      ("y_embedder.mlp.0", "text_embedder.linear_1"), ("y_embedder.mlp.2", "text_embedder.linear_2")):
        w.put(orig, f"time_text_embed.{new}")
    w.put("context_embedder", "context_embedder")
    for i in range(layers):
        o, n, last = f"joint_blocks.{i}", f"transformer_blocks.{i}", i == layers - 1
        w.put(f"{o}.x_block.attn.qkv", *(f"{n}.attn.to_{p}" for p in "qkv"))
        w.put(f"{o}.context_block.attn.qkv", *(f"{n}.attn.add_{p}_proj" for p in "qkv"))
        for orig, new in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                          ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            w.put(f"{o}.{orig}", f"{n}.{new}", kinds=("weight",))
        w.put(f"{o}.x_block.attn.proj", f"{n}.attn.to_out.0")
        w.put(f"{o}.context_block.attn.proj", f"{n}.attn.to_add_out")
        w.put(f"{o}.x_block.attn2.qkv", *(f"{n}.attn2.to_{p}" for p in "qkv"))
        w.put(f"{o}.x_block.attn2.proj", f"{n}.attn2.to_out.0")
        w.put(f"{o}.x_block.adaLN_modulation.1", f"{n}.norm1.linear")
        w.put(f"{o}.context_block.adaLN_modulation.1", f"{n}.norm1_context.linear", swap=last)
        w.put(f"{o}.x_block.mlp.fc1", f"{n}.ff.net.0.proj")
        w.put(f"{o}.x_block.mlp.fc2", f"{n}.ff.net.2")
        w.put(f"{o}.context_block.mlp.fc1", f"{n}.ff_context.net.0.proj")
        w.put(f"{o}.context_block.mlp.fc2", f"{n}.ff_context.net.2")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return w.done()


def _hf_layout(model: Any) -> dict[str, torch.Tensor]:
    """A text encoder as ComfyUI's clip_l.safetensors / t5xxl_fp16.safetensors hold it."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if "shared.weight" in sd:
        sd.pop("encoder.embed_tokens.weight")  # one tensor: the files keep shared.weight
    return {("text_model." + k if k.startswith(("embeddings.", "encoder.layers", "final_layer_norm")) else k): v
            for k, v in sd.items()}


def _configs(folder: Path) -> str:
    """A diffusers folder's configs and tokenizer files, as the metadata value the loader reads."""
    return json.dumps({rel: (folder / rel).read_text() for rel in CONFIG_FILES if (folder / rel).is_file()})


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _cfg(**model: Any) -> Any:
    return validate_config({"model": model, "training": {"t5xxl_max_token_length": 32}})


@pytest.fixture(scope="module")
def flux_files(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("flux-files")
    ref = _load_flow_folder(demo / "model-flux", _cfg(pretrained_model=str(demo / "model-flux")))
    c = ref.unet.config
    transformer = flux_to_bfl(ref.unet.state_dict(), c.num_layers, c.num_single_layers)
    meta = {"format": "pt", META_CONFIGS: _configs(demo / "model-flux")}
    return {
        "ref": ref,
        "model": _save(transformer, out / "flux1-dev.safetensors", meta),
        "clip_l": _save(_hf_layout(ref.text_encoders[0]), out / "clip_l.safetensors"),
        "t5xxl": _save(_hf_layout(ref.text_encoders[1]), out / "t5xxl_fp16.safetensors"),
        "t5xxl_fp8": _save({k: v.to(torch.float8_e4m3fn) for k, v in _hf_layout(ref.text_encoders[1]).items()},
                           out / "t5xxl_fp8_e4m3fn.safetensors"),
        "vae": _save(vae_to_ldm(ref.vae.state_dict(), ref.vae.config), out / "ae.safetensors"),
        "dir": out,
    }


def _assert_same(got: Any, want: Any) -> None:
    assert type(got.unet) is type(want.unet) and got.family == want.family
    assert got.extra == want.extra and dict(got.noise_scheduler.config) == dict(want.noise_scheduler.config)
    for a, b in zip([got.unet, got.vae, *got.text_encoders], [want.unet, want.vae, *want.text_encoders], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), type(a).__name__
        bad = [k for k in sb if sa[k].dtype != torch.float32 or not torch.equal(sa[k], sb[k])]
        assert not bad, f"{type(a).__name__}: {bad[:3]}"
    for ta, tb in zip(got.tokenizers, want.tokenizers, strict=True):
        assert ta("a red circle").input_ids == tb("a red circle").input_ids


# ------------------------------------------------------------------------------------ tests
def test_flux_single_files_load_every_tensor_of_the_folder(flux_files: dict[str, Any]):
    f = flux_files
    cfg = _cfg(pretrained_model=str(f["model"]), clip_l=str(f["clip_l"]), t5xxl=str(f["t5xxl"]), vae=str(f["vae"]))
    comps = load_components(cfg)
    _assert_same(comps, f["ref"])
    assert comps.source == str(f["model"]) and not any(p.requires_grad for p in comps.unet.parameters())


def test_a_bf16_run_loads_what_stays_frozen_in_bf16_as_an_fp32_load_cast(flux_files: dict[str, Any], demo: Path):
    """The run's weight dtype reaches the loaders: the denoiser, T5 and (unless a text-encoder LoRA may train
    them) the CLIPs come in it, with the numbers an fp32 load cast to it has; the VAE stays fp32."""
    f = flux_files
    files = {"pretrained_model": str(f["model"]), "clip_l": str(f["clip_l"]), "t5xxl": str(f["t5xxl"]), "vae": str(f["vae"])}
    cases = [(files, 1), ({"pretrained_model": str(demo / "model-flux")}, 1), ({"pretrained_model": str(demo / "model")}, None)]
    for model, t5 in cases:
        full = load_components(_cfg(**model))
        for train_te in (False, True):
            cfg = validate_config({"model": model, "training": {"t5xxl_max_token_length": 32},
                                   "network": {"train_text_encoder": train_te}})
            half = load_components(cfg, torch.bfloat16)
            frozen = [0] + [1 + i for i in range(len(half.text_encoders)) if i == t5 or not train_te]
            pairs = list(zip([full.unet, *full.text_encoders], [half.unet, *half.text_encoders], strict=True))
            for n, (a, b) in enumerate(pairs):
                sa, sb = a.state_dict(), b.state_dict()
                want = torch.bfloat16 if n in frozen else torch.float32
                assert {v.dtype for v in sb.values() if v.is_floating_point()} == {want}, (model, train_te, n)
                assert all(torch.equal(sb[k], v.to(want)) for k, v in sa.items()), (model, train_te, n)
            assert {p.dtype for p in half.vae.parameters()} == {torch.float32}


def test_fp8_t5_is_upcast_and_a_diffusers_layout_transformer_loads(flux_files: dict[str, Any]):
    f, ref = flux_files, flux_files["ref"]
    flat = f["dir"] / "flux-diffusers-layout.safetensors"
    _save(ref.unet.state_dict(), flat, {"format": "pt", META_CONFIGS: _metadata(f["model"])})
    assert detect_family(flat) == "flux"
    comps = load_components(_cfg(pretrained_model=str(flat), clip_l=str(f["clip_l"]), t5xxl=str(f["t5xxl_fp8"]),
                                 vae=str(f["vae"])))
    for k, v in ref.unet.state_dict().items():
        assert torch.equal(comps.unet.state_dict()[k], v), k
    t5 = comps.text_encoders[1].state_dict()
    for k, v in ref.text_encoders[1].state_dict().items():
        assert t5[k].dtype == torch.float32 and torch.equal(t5[k], v.to(torch.float8_e4m3fn).float()), k


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()[META_CONFIGS]


def test_sd3_single_checkpoint_with_its_text_encoders_and_vae_loads_every_tensor(demo: Path, tmp_path: Path):
    folder = demo / "model-sd3"
    ref = _load_flow_folder(folder, _cfg(pretrained_model=str(folder)))
    state = {f"model.diffusion_model.{k}": v for k, v in sd3_to_original(ref.unet.state_dict(), ref.unet.config.num_layers).items()}
    for name, te in zip(("clip_l", "clip_g", "t5xxl"), ref.text_encoders, strict=True):
        state |= {f"text_encoders.{name}.transformer.{k}": v for k, v in _hf_layout(te).items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(ref.vae.state_dict(), ref.vae.config).items()}
    path = _save(state, tmp_path / "sd3.5_medium_incl_clips_t5xxl.safetensors", {META_CONFIGS: _configs(folder)})
    assert detect_family(path) == "sd3"
    comps = load_components(_cfg(pretrained_model=str(path)))
    _assert_same(comps, ref)
    assert comps.extra["t5_length"] == 32
    # Without its text encoders the file says which field to set.
    bare = _save({k: v for k, v in state.items() if not k.startswith("text_encoders.clip_g.")}, tmp_path / "no-g.safetensors",
                 {META_CONFIGS: _configs(folder)})
    with pytest.raises(ModelLoadError, match=r"^model\.clip_g: no-g\.safetensors holds no CLIP-G .*set model\.clip_g to"):
        load_components(_cfg(pretrained_model=str(bare)))


def test_a_missing_part_or_path_names_the_field(flux_files: dict[str, Any], tmp_path: Path):
    f = flux_files
    with pytest.raises(ModelLoadError) as err:
        load_components(_cfg(pretrained_model=str(f["model"]), clip_l=str(f["clip_l"]), vae=str(f["vae"])))
    assert str(err.value) == ("model.t5xxl: Flux.1 single file checkpoints hold only the transformer; set model.t5xxl "
                              "to the T5-XXL .safetensors (t5xxl_fp16.safetensors)")
    with pytest.raises(ModelLoadError, match=r"^model\.vae: Flux\.1 single file .*set model\.vae .*ae\.safetensors"):
        load_components(_cfg(pretrained_model=str(f["model"]), clip_l=str(f["clip_l"]), t5xxl=str(f["t5xxl"])))
    missing = tmp_path / "nowhere" / "clip_l.safetensors"
    with pytest.raises(ModelLoadError, match=rf"^model\.clip_l: {missing} does not exist$"):
        load_components(_cfg(pretrained_model=str(f["model"]), clip_l=str(missing), t5xxl=str(f["t5xxl"]), vae=str(f["vae"])))
    with pytest.raises(ModelLoadError, match=r"^model\.t5xxl: cannot load clip_l\.safetensors .*The T5-XXL weights do not fit"):
        load_components(_cfg(pretrained_model=str(f["model"]), clip_l=str(f["clip_l"]), t5xxl=str(f["clip_l"]),
                             vae=str(f["vae"])))

    # A part set where no part is read is refused, not ignored: a folder holds its own; Flux.1 has no CLIP-G.
    with pytest.raises(ModelLoadError, match=r"^model\.clip_l: only for SD3/Flux\.1 single-file models; model-flux is a "
                                             r"diffusers folder, which holds its own parts: clear it$"):
        load_components(_cfg(pretrained_model=f["ref"].source, clip_l=str(f["clip_l"])))
    with pytest.raises(ModelLoadError, match=r"^model\.clip_g: flux has no such part \(clip_g is for sd3\): clear it$"):
        load_components(_cfg(pretrained_model=str(f["model"]), clip_l=str(f["clip_l"]), t5xxl=str(f["t5xxl"]),
                             vae=str(f["vae"]), clip_g=str(f["clip_l"])))


def test_detection_from_tensor_names():
    flux = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
    assert keys_family(flux) == "flux" and flow_variant(set(flux)) == "flux-schnell"
    assert flow_variant({f"model.diffusion_model.{k}" for k in [*flux, "guidance_in.in_layer.weight"]}) == "flux-dev"
    diffusers = ["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_mlp.weight"]
    assert keys_family(diffusers) == "flux"
    sd3 = [f"model.diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(24)] + ["text_encoders.clip_l.x"]
    assert keys_family(sd3) == "sd3" and flow_variant(set(sd3)) == "sd3-medium"
    assert flow_variant({*sd3, "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"}) == "sd3.5-medium"
    assert flow_variant({f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(38)}) == "sd3.5-large"
    # SD detection is unchanged, and a LoRA is none of these.
    assert keys_family(["conditioner.embedders.0.transformer.a", "conditioner.embedders.1.model.b"]) == "sdxl"
    assert keys_family(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) is None


# The published models: parameter counts of the diffusers modules (the pos_embed buffer not counted:
# + 226,492,416 for SD3.5 medium, the "2.5B"; + 89,653,248 for large, the "8.1B"), and shapes of the real files.
PUBLISHED = {
    "flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560,  # "12B"; schnell lacks the guidance embedder
    "sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520,
}  # fmt: skip


FLUX_SHAPES = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
               "double_blocks.18.img_attn.qkv.weight": (9216, 3072), "single_blocks.37.linear1.weight": (21504, 3072),
               "single_blocks.37.linear2.weight": (3072, 15360), "final_layer.adaLN_modulation.1.weight": (6144, 3072)}
REAL_SHAPES = {  # tensors of flux1-dev / flux1-schnell / sd3_medium / sd3.5_medium / sd3.5_large .safetensors
    "flux-dev": {**FLUX_SHAPES, "guidance_in.in_layer.weight": (3072, 256)},
    "flux-schnell": FLUX_SHAPES,
    "sd3-medium": {"pos_embed": (1, 36864, 1536), "joint_blocks.23.x_block.attn.qkv.weight": (4608, 1536),
                   "context_embedder.weight": (1536, 4096), "y_embedder.mlp.0.weight": (1536, 2048)},
    "sd3.5-medium": {"pos_embed": (1, 147456, 1536), "joint_blocks.12.x_block.attn2.qkv.weight": (4608, 1536),
                     "joint_blocks.0.x_block.attn.ln_q.weight": (64,), "x_embedder.proj.weight": (1536, 16, 2, 2)},
    "sd3.5-large": {"pos_embed": (1, 36864, 2432), "joint_blocks.37.x_block.attn.qkv.weight": (7296, 2432),
                    "context_embedder.weight": (2432, 4096), "joint_blocks.0.context_block.attn.ln_k.weight": (64,)},
}


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_shipped_configs_build_the_published_models(variant: str):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import AutoConfig

    folder = CONFIG_ROOT / variant
    cls = FluxTransformer2DModel if variant.startswith("flux") else SD3Transformer2DModel
    with torch.device("meta"):  # buffers too: SD3's sin-cos position table is not computed
        model = cls.from_config(cls.load_config(str(folder / "transformer")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[variant]
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683 and vae.config.latent_channels == 16
    assert vae.config.scaling_factor == (0.3611 if variant.startswith("flux") else 1.5305)
    # The real files' layout and shapes: detected as this variant, converted back to exactly this model.
    sd = model.state_dict()
    c = model.config
    orig = flux_to_bfl(sd, c.num_layers, c.num_single_layers) if c.get("num_single_layers") else sd3_to_original(sd, c.num_layers)
    assert {k: tuple(orig[k].shape) for k in REAL_SHAPES[variant]} == REAL_SHAPES[variant]
    assert flow_variant(set(orig)) == variant
    family = "flux" if variant.startswith("flux") else "sd3"
    back = _transformer(family, {f"model.diffusion_model.{k}": v for k, v in orig.items()}, folder / "transformer")
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    encoders = sorted(p.name for p in folder.glob("text_encoder*"))
    widths = [AutoConfig.from_pretrained(str(folder / e)).to_dict() for e in encoders]
    got = [(w.get("hidden_size") or w["d_model"], w.get("num_hidden_layers") or w["num_layers"]) for w in widths]
    assert got == ([(768, 12), (4096, 24)] if variant.startswith("flux") else [(768, 12), (1280, 32), (4096, 24)])


def test_shipped_t5_tokenizer_is_t5_v1_1():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(T5_TOKENIZER), local_files_only=True)
    assert tok("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1] and len(tok) == 32100


@pytest.mark.train
def test_a_short_flux_run_from_single_files_completes(demo: Path, flux_files: dict[str, Any], tmp_path: Path):
    data = json.loads((ROOT / "presets" / "demo-flux.json").read_text())
    f = flux_files
    data["model"] = {"pretrained_model": str(f["model"]), "clip_l": str(f["clip_l"]), "t5xxl": str(f["t5xxl"]),
                     "vae": str(f["vae"])}
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data.update(output_dir=str(tmp_path / "runs"))
    data["training"] |= {"max_train_epochs": 1}
    data["sampling"] = {"prompts": []}
    data["saving"] = {"save_every_n_epochs": None, "save_last_n_epochs": None}
    proc = run_cli("train", str(write_config(tmp_path / "flux-single.json", data)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    v = Path(proc.stdout.splitlines()[0])
    assert events(v, "run_started")[0]["family"] == "flux"
    assert events(v, "run_finished")[0]["state"] == "finished" and events(v, "step")
    assert (v / "exports" / "demo-flux.safetensors").is_file()
