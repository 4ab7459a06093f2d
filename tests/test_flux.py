"""Flux.1 (backend/trainer/families/flux.py): latent packing and positions against sd-scripts'
definitions (library/flux_utils.py, written out again here), the sd-scripts LoRA format read back by
diffusers' own converter at the real model's widths, and real runs of the tiny Flux.1-dev-shaped demo
(presets/demo-flux.json): it learns, samples, its export holds exactly the trained update, and the
diffusers-format export loads with load_lora_weights and changes the image; step save points rotate
and verify. Exact mid-epoch resume, verify and 2-process DDP on Flux are tests/test_combos.py's
flux-ddp-shift case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backend.config import validate_config
from backend.trainer.families import flux
from backend.trainer.loss import LossSettingError
from tests.conftest import ROOT, events, run_cli, write_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ formulas
def test_packing_and_image_ids_are_sd_scripts():
    x = torch.randn(2, 16, 6, 8, generator=gen())
    # flux_utils.pack_latents: rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph = pw = 2
    want = torch.stack([x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 64) for i in range(3) for j in range(4)],
                       dim=1)
    packed = flux.pack(x)
    assert torch.equal(packed, want)
    assert torch.equal(flux.unpack(packed, 3, 4), x)
    from diffusers import FluxPipeline

    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))  # the pipeline samples with the same layout
    ids = flux.image_ids(3, 4, torch.device("cpu"), torch.float32)
    assert ids.shape == (12, 3) and ids[:, 0].eq(0).all()
    assert [tuple(r) for r in ids[:, 1:].long().tolist()] == [(i, j) for i in range(3) for j in range(4)]


def test_layer_names_are_sd_scripts_originals():
    assert flux.original_name("transformer_blocks.3.attn.add_k_proj") == ("lora_unet_double_blocks_3_txt_attn_qkv", 1)
    assert flux.original_name("transformer_blocks.0.norm1_context.linear") == ("lora_unet_double_blocks_0_txt_mod_lin", 0)
    assert flux.original_name("single_transformer_blocks.12.proj_mlp") == ("lora_unet_single_blocks_12_linear1", 3)
    assert flux.original_name("single_transformer_blocks.1.norm.linear") == ("lora_unet_single_blocks_1_modulation_lin", 0)
    with pytest.raises(ValueError, match="proj_out: not a layer"):
        flux.original_name("proj_out")  # the final layer: not in sd-scripts' Flux LoRA


def test_the_sd_scripts_format_reads_back_exactly_through_diffusers_converter(tmp_path: Path):
    """At Flux.1's real widths (3072 hidden, 12288 MLP; diffusers' converter assumes them): every diffusers
    layer's update up @ down x alpha / rank, written fused as sd-scripts' format, comes back the same from
    FluxPipeline.lora_state_dict (which ComfyUI's and sd-scripts' loaders read the same way)."""
    from diffusers import FluxPipeline

    hidden, mlp, rank, alpha = 3072, 12288, 2, 1.0
    g = gen(3)
    shapes = {f"transformer_blocks.0.{name}": (hidden, hidden) for name in flux.DOUBLE}
    shapes |= {"transformer_blocks.0.norm1.linear": (hidden, 6 * hidden),
               "transformer_blocks.0.norm1_context.linear": (hidden, 6 * hidden),
               "transformer_blocks.0.ff.net.0.proj": (hidden, 4 * hidden), "transformer_blocks.0.ff.net.2": (4 * hidden, hidden),
               "transformer_blocks.0.ff_context.net.0.proj": (hidden, 4 * hidden),
               "transformer_blocks.0.ff_context.net.2": (4 * hidden, hidden)}
    shapes |= {f"single_transformer_blocks.1.attn.to_{p}": (hidden, hidden) for p in "qkv"}
    shapes |= {"single_transformer_blocks.1.proj_mlp": (hidden, mlp),
               "single_transformer_blocks.1.proj_out": (hidden + mlp, hidden),
               "single_transformer_blocks.1.norm.linear": (hidden, 3 * hidden)}
    layers = {n: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha) for n, (i, o) in shapes.items()}
    tensors = flux.to_sd_scripts(layers)
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * rank, hidden)
    assert tensors["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * hidden + mlp, 4 * rank)
    assert float(tensors["lora_unet_single_blocks_1_linear1.alpha"]) == 4 * alpha
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    read = FluxPipeline.lora_state_dict(str(path))
    read = read[0] if isinstance(read, tuple) else read
    assert {k.rsplit(".lora_", 1)[0] for k in read} == {f"transformer.{n}" for n in layers}
    for name, (down, up, a) in layers.items():
        got = read[f"transformer.{name}.lora_B.weight"] @ read[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(got, up @ down * (a / rank), rtol=1e-5, atol=1e-5)


def test_a_part_of_a_fused_layer_left_untrained_is_written_as_zeros():
    g = gen(4)
    q = (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0)
    out = flux.to_sd_scripts({"transformer_blocks.0.attn.to_q": q})
    up, down = out["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], out["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert up.shape == (24, 6) and down.shape == (6, 8)
    torch.testing.assert_close(up[:8] @ down, q[1] @ q[0])
    assert up[8:].eq(0).all() and down[2:].eq(0).all()
    with pytest.raises(ValueError, match="proj_mlp cannot be written without the attention layers"):
        flux.to_sd_scripts({"single_transformer_blocks.0.proj_mlp": q})


def test_settings_flux_cannot_train_with_are_refused_by_name():
    from types import SimpleNamespace

    cfg = validate_config({"model": {"family": "flux"}, "network": {"type": "loha"},
                           "dataset": {"resolution": 72, "bucket_reso_steps": 24},
                           "training": {"noise_offset": 0.05}, "saving": {"export_format": "auto"}})
    comps = SimpleNamespace(vae_scale_factor=8)
    with pytest.raises(LossSettingError) as err:
        flux.FLUX.check(cfg, comps)
    fields = re.findall(r"(?:^|; )([a-z_]+\.[a-z_]+): ", str(err.value))
    assert fields == ["training.noise_offset", "network.type", "dataset.bucket_reso_steps", "dataset.resolution"]
    sd3 = validate_config({"saving": {"export_format": "sd-scripts"}})
    from backend.trainer.families import family

    with pytest.raises(LossSettingError, match="saving.export_format: SD3/SD3.5 LoRAs are written with diffusers"):
        family("sd3").export_format(sd3)
    assert flux.FLUX.export_format(sd3) == "sd-scripts" and family("sdxl").export_format(validate_config({})) == "sd-scripts"


# ------------------------------------------------------------------------------ T5 run once per caption
def test_with_clip_trained_t5_runs_once_per_caption_and_gives_what_it_computes_each_step(demo: Path, tmp_path: Path):
    """A run that trains CLIP-L keeps T5-XXL frozen: its output per caption is computed once
    (caching.FrozenOutputs), so a step's text costs CLIP's forward only, with the numbers a per-step T5
    would give. A prompt the fill did not see runs T5 and is not kept."""
    from backend.presets import resolve
    from backend.trainer import models
    from backend.trainer.caching import TextEncoder

    comps = models.load_components(resolve(json.loads(_config(demo, tmp_path, "t5").read_text())))
    captions = {"a red circle", "a blue square, on a white background", ""}
    assert comps.spec.memoizable_text_encoders(2) == [1] and 1 not in comps.spec.trained_text_encoders(2)
    plain = TextEncoder(comps, clip_skip=1, cache=False)
    memo = TextEncoder(comps, clip_skip=1, cache=False)
    assert memo.memoize_frozen([1], captions) == 3 and len(memo.frozen[1].memo) == 3
    calls = []
    comps.text_encoders[1].register_forward_hook(lambda *a: calls.append(1))
    batch = ["a blue square, on a white background", "a red circle", "a red circle"]
    with torch.no_grad():
        want_ctx, want_pooled = plain.encode(batch)
        n = len(calls)
        ctx, pooled = memo.encode(batch)
    assert n == 1 and len(calls) == 1  # T5 did not run for the memoized batch
    torch.testing.assert_close(ctx, want_ctx, rtol=1e-6, atol=1e-6)
    assert torch.equal(pooled, want_pooled)  # CLIP ran as before
    with torch.no_grad():
        memo.bare().encode(["a prompt only a sample uses"])
    assert len(calls) == 2 and len(memo.frozen[1].memo) == 3
    # On a GPU the module is parked on the CPU after the fill: a miss's output is brought to the memo's device.
    t5 = memo.frozen[1]
    t5.device = torch.device("meta")  # a device other than the module's, as CUDA is for a parked T5
    ids = comps.tokenizers[1](["another prompt"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        assert t5(ids)[0].device.type == "meta" and len(calls) == 3


# ------------------------------------------------------------------------------------------ real runs
def _config(demo: Path, tmp_path: Path, name: str, **changes) -> Path:
    data = json.loads((ROOT / "presets" / "demo-flux.json").read_text())
    data["model"]["pretrained_model"] = str(demo / "model-flux")
    data["dataset"]["train_data_dir"] = str(demo / "images")
    data.update(output_dir=str(tmp_path / name))
    data["saving"]["save_last_n_epochs"] = None
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return write_config(tmp_path / f"{name}.json", data)


def _run(config: Path) -> Path:
    proc = run_cli("train", str(config), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return Path(proc.stdout.splitlines()[0])


def _updates(path: Path, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """Each original (sd-scripts) layer's update up @ down x alpha / rank, from an sd-scripts-format file."""
    t = load_file(str(path))
    stems = {k.split(".")[0] for k in t if k.startswith(prefix)}
    return {s: t[f"{s}.lora_up.weight"].float() @ t[f"{s}.lora_down.weight"].float()
            * (float(t[f"{s}.alpha"]) / t[f"{s}.lora_down.weight"].shape[0]) for s in stems}


def _diffusers_updates(tensors: dict[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """The same updates from diffusers-named lora_A/lora_B tensors (a checkpoint's, scaled by alpha / rank =
    `scale`, or a diffusers-format export's), fused as the original layers hold them."""
    layers = {}
    for k, down in tensors.items():
        if k.startswith(prefix) and ".lora_A." in k:
            name = k[len(prefix):].split(".lora_A.")[0]
            layers[name] = (down.float(), tensors[k.replace(".lora_A.", ".lora_B.")].float(), scale * down.shape[0])
    t = flux.to_sd_scripts(layers)
    stems = {k.split(".")[0] for k in t}
    return {s: t[f"{s}.lora_up.weight"] @ t[f"{s}.lora_down.weight"]
            * (float(t[f"{s}.alpha"]) / t[f"{s}.lora_down.weight"].shape[0]) for s in stems}


@pytest.mark.train
def test_the_flux_demo_learns_samples_and_exports_what_it_trained(demo: Path, tmp_path: Path):
    v = _run(_config(demo, tmp_path, "runs", network={"train_text_encoder": True}))  # CLIP-L too; T5 stays frozen
    assert events(v, "run_started")[0]["family"] == "flux"
    text = [e for e in events(v, "cache_filled") if e["kind"] == "text"]
    assert len(text) == 1 and text[0]["frozen_encoders"] == [1] and text[0]["count"] >= 1  # T5 once per caption
    ref = [json.loads((v / "checkpoints" / f"epoch-{e:06d}" / "manifest.json").read_text())["ref_loss"] for e in (1, 4)]
    assert ref[1] < ref[0], ref  # the fixed-noise reference loss went down
    pngs = sorted((v / "samples" / "final").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as im:
            assert im.size == (64, 64) and "Steps: 4" in im.info["parameters"] and "CFG scale: 3.5" in im.info["parameters"]
    export = v / "exports" / "demo-flux.safetensors"
    with safe_open(str(export), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")) for k in keys)
    assert {"lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_single_blocks_1_linear1.lora_up.weight",
            "lora_unet_double_blocks_0_txt_mod_lin.lora_down.weight", "lora_unet_single_blocks_0_linear2.alpha"} <= set(keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_guidance_scale"] == "1.0"
    assert "modelspec.prediction_type" not in meta
    # The file holds the final state's update, layer for layer (fp16 in the file).
    state = load_file(str(v / "checkpoints" / "final" / "lora.safetensors"))
    want = _diffusers_updates(state, "unet.", 1.0)  # alpha 4 = rank 4
    got = _updates(export)
    assert set(got) == set(want) and len(got) == 1 * 10 + 2 * 3  # 10 original layers per double block, 3 per single
    for stem in want:
        torch.testing.assert_close(got[stem], want[stem], rtol=2e-3, atol=2e-4)
    # CLIP-L's LoRA under sd-scripts' lora_te1_ names (kohya's, with CLIP's text_model.), nothing of T5's.
    te = {k.split(".lora_A.")[0][len("text_encoder_0."):] for k in state if k.startswith("text_encoder_0.") and ".lora_A." in k}
    assert te and not any(k.startswith("text_encoder_1.") for k in state)
    te_stems = {k.split(".")[0] for k in keys if k.startswith("lora_te1_")}
    assert te_stems == {"lora_te1_text_model_" + n.replace(".", "_") for n in te}
    assert all(_updates(export, "lora_te1_")[s].abs().max() > 0 for s in te_stems)

    # The same training written with diffusers' names: load_lora_weights takes it and the image changes.
    # A step save point after every step, the newest two kept: rotation prunes the others, state and export.
    d = _run(_config(demo, tmp_path, "runs-diffusers", training={"max_train_epochs": 1}, sampling={"prompts": []},
                     network={"train_text_encoder": True},
                     saving={"export_format": "diffusers", "save_every_n_epochs": None, "save_every_n_steps": 1,
                             "save_last_n_steps": 2}))
    last = max(e["step"] for e in events(d, "step"))
    assert last >= 3 and [e["step"] for e in events(d, "checkpoint_saved") if e["kind"] == "step"] == list(range(1, last + 1))
    assert sorted(p.name for p in (d / "checkpoints").glob("step-*")) == [f"step-{k:08d}" for k in (last - 1, last)]
    assert sorted(p.name for p in (d / "exports").glob("*-step*")) == [f"demo-flux-step{k:08d}.safetensors"
                                                                       for k in (last - 1, last)]
    verified = run_cli("verify", str(d / "checkpoints" / f"step-{last - 1:08d}"), timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    export_d = d / "exports" / "demo-flux.safetensors"
    tensors = load_file(str(export_d))
    assert tensors and all(k.startswith(("transformer.", "text_encoder.text_model.")) for k in tensors)
    assert any(k.startswith("text_encoder.") for k in tensors)
    first = _updates(v / "exports" / "demo-flux-000001.safetensors")
    same = _diffusers_updates(tensors, "transformer.", 1.0)  # alpha / rank is folded into lora_B
    for stem in first:
        torch.testing.assert_close(same[stem], first[stem], rtol=2e-3, atol=2e-4)
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(demo / "model-flux"), local_files_only=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
              guidance_scale=3.5, output_type="np")
    before = pipe(generator=gen(0), **kw).images
    pipe.load_lora_weights(str(export_d))
    assert pipe.get_list_adapters() == {"transformer": ["default_0"], "text_encoder": ["default_0"]}
    after = pipe(generator=gen(0), **kw).images
    assert abs(after - before).max() > 1e-3  # the LoRA changes the image
