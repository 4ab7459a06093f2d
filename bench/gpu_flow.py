"""The flow-matching shapes of bench/gpu.py (its docstring says what is measured and what it costs):
Flux.1-dev and SD3.5 large with random weights from the shipped configs, the memory levers Lathe's
trainer runs under, and the bare loop of the plain bf16 case.

The levers, each on top of the one before (sd-scripts' order of advice, docs/flux_train_network.md 6.1
and docs/sd3_train_network.md): bf16; + training.gradient_checkpointing; + model.fp8_base; +
training.blocks_to_swap at two depths. Flux.1: 18 (sd-scripts' example command, the 16 GB setting) and
28 (its 8 GB row); SD3.5 large (38 blocks, at most 36 swap): 18 and 32 (sd-scripts' SD3 example).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bare_loop

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "backend" / "trainer" / "model_configs"

MODELS = ("flux", "sd35")
VARIANT = {"flux": "flux-dev", "sd35": "sd3.5-large"}  # the shipped config folder
FAMILY = {"flux": "flux", "sd35": "sd3"}  # Lathe's model.family
TITLE = {"flux": "Flux.1-dev", "sd35": "SD3.5 large"}
SWAPS = {"flux": (18, 28), "sd35": (18, 32)}
DRY_SWAPS = {"flux": (2, 3), "sd35": (1, 2)}  # what the tiny transformers below allow (2 of each kind stay)

# Tiny stand-ins for --dry-run, laid over the shipped configs (the demo models' sizes, a few more blocks
# so that block swap has some to swap).
TINY_TRANSFORMER = {
    "flux": {"num_layers": 3, "num_single_layers": 6, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
    "sd35": {"num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
             "joint_attention_dim": 64, "pooled_projection_dim": 64},  # CLIP-L + CLIP-G projections, 32 each
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
TINY_T5_TOKENS = 32  # training.t5xxl_max_token_length in a dry run (the family's own on a GPU: 512, 256)


@dataclass(frozen=True)
class Lever:
    key: str  # bf16 | checkpointing | fp8_base | swap<N>
    label: str
    settings: tuple[tuple[str, Any], ...]  # dotted config paths and values, the levers before included

    def sections(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path, value in self.settings:
            section, name = path.split(".")
            out.setdefault(section, {})[name] = value
        return out


def levers(model: str, dry: bool) -> list[Lever]:
    gc = (("training.gradient_checkpointing", True),)
    fp8 = (*gc, ("model.fp8_base", True))
    out = [Lever("bf16", "bf16", ()), Lever("checkpointing", "+ gradient_checkpointing", gc),
           Lever("fp8_base", "+ fp8_base", fp8)]
    for n in (DRY_SWAPS if dry else SWAPS)[model]:
        out.append(Lever(f"swap{n}", f"+ blocks_to_swap {n}", (*fp8, ("training.blocks_to_swap", n))))
    return out


def lever(model: str, key: str, dry: bool) -> Lever:
    found = [lv for lv in levers(model, dry) if lv.key == key]
    if not found:
        raise ValueError(f"no lever {key!r} for {model} (have {', '.join(lv.key for lv in levers(model, dry))})")
    return found[0]


# ------------------------------------------------------------------------------ random-weight models
def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _part(model: str, sub: str, dry: bool, tiny: dict[str, Any]) -> dict[str, Any]:
    cfg = _json(CONFIGS / VARIANT[model] / sub / "config.json")
    return {**cfg, **tiny} if dry else cfg


@contextlib.contextmanager
def _building(device: Any, dtype: Any) -> Iterator[None]:
    """Modules created inside are made on `device` in `dtype` (no fp32 copy of a 12B model first)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def _frozen(module: Any, dtype: Any) -> Any:
    if any(p.dtype != dtype for p in module.parameters()):  # built in dtype already: no cast (nor diffusers' note on it)
        module = module.to(dtype)
    return module.requires_grad_(False).eval()


def build_transformer(model: str, dry: bool, device: Any, dtype: Any) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if model == "flux" else SD3Transformer2DModel
    with _building(device, dtype):
        return _frozen(cls.from_config(_part(model, "transformer", dry, TINY_TRANSFORMER[model])), dtype)


def _text_encoders(model: str, dry: bool, device: Any, dtype: Any) -> tuple[list[Any], list[Any]]:
    """CLIP-L (and CLIP-G for SD3) and T5-XXL with their tokenizers, as the pipeline orders them."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from backend.trainer.clip_tokenizer import load_tokenizer

    folder = CONFIGS / VARIANT[model]
    clips = ["text_encoder"] + (["text_encoder_2"] if model == "sd35" else [])
    tes, toks = [], []
    with _building(device, dtype):
        for i, sub in enumerate(clips):
            cfg = _part(model, sub, dry, TINY_CLIP)
            cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in cfg.get("architectures", []) else CLIPTextModel
            tes.append(_frozen(cls(CLIPTextConfig.from_dict(cfg)), dtype))
            toks.append(load_tokenizer(folder / ("tokenizer_2" if i else "tokenizer")))
        t5 = _part(model, f"text_encoder_{len(clips) + 1}", dry, TINY_T5)
        tes.append(_frozen(T5EncoderModel(T5Config.from_dict(t5)), dtype))
    toks.append(AutoTokenizer.from_pretrained(str(CONFIGS / "t5_tokenizer"), local_files_only=True))
    return tes, toks


def flow_components(cfg: Any, dry: bool) -> Any:
    """Stand-in for load_components on a flow family: every component from the shipped configs with
    random weights, made directly on the training device in its weight dtype (bf16 on CUDA): a 12B
    transformer and T5-XXL initialized on the CPU would take minutes. A real load leaves everything
    on the CPU; the denoiser goes back there under fp8_base or blocks_to_swap, whose cast and swap
    start from the CPU (so their peak is the one a real run has). In the other cases it stays on the
    GPU, where the trainer would place it; the text encoders always stay (the trainer places them
    before it encodes the captions, then sends them back to the CPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from backend.trainer.models import Components, flow_extra

    family = cfg.model.family
    model = next(m for m, f in FAMILY.items() if f == family)
    cuda = cfg.launch.device == "cuda"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    transformer = build_transformer(model, dry, device, dtype)
    with _building(device, dtype):
        vae = _frozen(AutoencoderKL.from_config({**_json(CONFIGS / VARIANT[model] / "vae" / "config.json"),
                                                 **(TINY_VAE if dry else {})}), dtype)
    tes, toks = _text_encoders(model, dry, device, dtype)
    folder = CONFIGS / VARIANT[model] / "scheduler"
    sched = FlowMatchEulerDiscreteScheduler.from_config(FlowMatchEulerDiscreteScheduler.load_config(str(folder)))
    if cuda:
        if cfg.model.fp8_base or cfg.training.blocks_to_swap:
            transformer.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return Components(family=family, v_prediction=False, unet=transformer, vae=vae, noise_scheduler=sched,
                      text_encoders=tes, tokenizers=toks, source=f"random:{VARIANT[model]}:{'tiny' if dry else 'full'}",
                      extra=flow_extra(family, cfg))


# ------------------------------------------------------------------------------------ bare worker
def _inputs(model: str, config: dict[str, Any], batch: int, resolution: int, t5_tokens: int, device: Any,
            dtype: Any) -> dict[str, Any]:
    """Random conditioning of the transformer's real shapes (cached text embeddings, as Lathe trains)."""
    import torch

    from backend.trainer.families import flux

    ctx_len = t5_tokens if model == "flux" else 77 + t5_tokens  # SD3: CLIP states, then T5's
    kw = {"encoder_hidden_states": torch.randn(batch, ctx_len, config["joint_attention_dim"], device=device, dtype=dtype),
          "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype)}
    if model == "flux":
        side = resolution // 16  # 8x VAE, 2x2 packing
        kw["img_ids"] = flux.image_ids(side, side, device, dtype)
        kw["txt_ids"] = torch.zeros(ctx_len, 3, device=device, dtype=dtype)
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return kw


def bare_worker(model: str, resolution: int, batch: int, steps: int, warmup: int, dry: bool, device_info: Any,
                rank: int, lr: float, weight_decay: float, max_grad_norm: float) -> dict[str, Any]:
    """The reference loop for the plain bf16 case: the transformer in bf16 (frozen), peft LoRA (fp32) on
    Lathe's default targets for the family, fused AdamW, bf16 autocast, random latents and text
    context, the flow-matching velocity target (noise - latents) under MSE, gradient clipping. Also
    counts the FLOPs of one forward+backward step."""
    import torch
    import torch.nn.functional as F

    from backend.trainer.families import family, flux

    device, name, peak = device_info()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    net = build_transformer(model, dry, device, dtype)
    targets = family(FAMILY[model]).default_targets(net)
    params = bare_loop.inject_lora(net, targets, rank)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda)
    t5_tokens = TINY_T5_TOKENS if dry else (512 if model == "flux" else 256)
    kw = _inputs(model, dict(net.config), batch, resolution, t5_tokens, device, dtype)
    lat_side = resolution // 8
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def forward_backward() -> torch.Tensor:
        lat = torch.randn(batch, 16, lat_side, lat_side, device=device)
        noise = torch.randn_like(lat)
        sigma = torch.rand(batch, device=device)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * lat + sigma.view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if model == "flux":
                h = lat_side // 2
                pred = flux.unpack(net(hidden_states=flux.pack(noisy).to(dtype), timestep=sigma.to(dtype), **kw).sample, h, h)
            else:
                pred = net(hidden_states=noisy.to(dtype), timestep=(sigma * 1000).to(dtype), **kw).sample
        loss = F.mse_loss(pred.float(), noise - lat)
        loss.backward()
        return loss.detach()

    return bare_loop.time_steps(forward_backward, params, opt, max_grad_norm, steps, warmup, batch, cuda, name, peak)


# ----------------------------------------------------------------------------------- Lathe worker
def config_overrides(model: str, lv: Lever, dry: bool) -> dict[str, dict[str, Any]]:
    """The flow family's sections of the bench config under one lever."""
    sections = lv.sections()
    training = {"mixed_precision": "no" if dry else "bf16", **sections.get("training", {})}
    if dry:
        training["t5xxl_max_token_length"] = TINY_T5_TOKENS
    return {"model": {"pretrained_model": str(CONFIGS / VARIANT[model]), "family": FAMILY[model],
                      **sections.get("model", {})},
            "training": training}


def split_setup_peak() -> dict[str, float]:
    """Record the CUDA peak of the trainer's setup (model placement, latent and text caching) and
    restart the counter before the first step, so that the run's own `run_finished` peak is that of
    training (steps and the final export). Wraps backend.trainer.build.build_setup, which the recipe
    looks up when it runs; the returned dict gets `setup_peak_gpu_mb`."""
    import torch

    import backend.trainer.build as build

    seen: dict[str, float] = {}
    original = getattr(build.build_setup, "unwrapped", build.build_setup)  # one wrapper, however many runs

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        setup = original(*args, **kwargs)
        if torch.cuda.is_available():
            seen["setup_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        return setup

    wrapped.unwrapped = original  # type: ignore[attr-defined]
    build.build_setup = wrapped
    return seen


# ------------------------------------------------------------------------------------------ report
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def lever_report(model: str, resolution: int, batch: int, bare: dict[str, Any],
                 lathes: list[tuple[str, dict[str, Any]]], dry: bool) -> dict[str, Any]:
    """One flow family: each lever's Lathe result with its MFU (the bare loop's FLOP count) and its
    ratios to the bf16 lever; the bf16 lever against the bare loop."""
    flops, peak = bare.get("flops_per_step"), bare.get("peak_bf16_flops")
    for r in [bare] + [r for _, r in lathes]:
        r["mfu"] = flops / r["step_s"] / peak if flops and peak and r.get("step_s") else None
    base = dict(lathes).get("bf16", {})
    keys = ("step_s", "peak_gpu_mb", "train_peak_gpu_mb", "setup_peak_gpu_mb")
    rows = [{"key": key, "label": lever(model, key, dry).label, "settings": dict(lever(model, key, dry).settings),
             "lathe": r, "vs_bf16": {k: _ratio(r.get(k), base.get(k)) for k in keys}} for key, r in lathes]
    return {"model": model, "title": TITLE[model], "variant": VARIANT[model], "resolution": resolution, "batch": batch,
            "label": f"{TITLE[model]} {resolution}px b{batch}", "flops_per_step": flops, "bare": bare,
            "lathe_over_bare": {k: _ratio(base.get(k), bare.get(k)) for k in ("step_s", "peak_gpu_mb", "peak_rss_mb")},
            "levers": rows}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def lever_table(fam: dict[str, Any]) -> str:
    """The levers of one family as text: absolute figures, then the ratios to bf16."""
    lines = [f"{fam['label']}, rank 16: memory levers, each on top of the ones above (x: against bf16)",
             f"{'lever':<26}{'s/step':>9}{'train GPU MB':>14}{'setup GPU MB':>14}{'RSS MB':>9}{'MFU':>7}"
             f"{'x s/step':>10}{'x train MB':>12}{'x peak MB':>11}"]
    rows = [("bare loop (bf16)", fam["bare"], None)] + [(lv["label"], lv["lathe"], lv["vs_bf16"]) for lv in fam["levers"]]
    notes: list[str] = []
    for label, r, q in rows:
        if "error" in r:
            lines.append(f"{label:<26}FAILED: {r['error'][:200]}")
            continue
        train = r.get("train_peak_gpu_mb", r.get("peak_gpu_mb"))
        mfu = _fmt(r["mfu"] * 100 if r.get("mfu") else None, ".1f", "%")
        lines.append(f"{label:<26}{r['step_s']:>9.4f}{_fmt(train, '.0f'):>14}{_fmt(r.get('setup_peak_gpu_mb'), '.0f'):>14}"
                     f"{_fmt(r.get('peak_rss_mb'), '.0f'):>9}{mfu:>7}"
                     + ("" if q is None else f"{_fmt(q['step_s'], '.2f', 'x'):>10}{_fmt(q['train_peak_gpu_mb'], '.2f', 'x'):>12}"
                                             f"{_fmt(q['peak_gpu_mb'], '.2f', 'x'):>11}"))
        notes += [f"  {label}: {w}" for w in r.get("warnings", []) if f"  {label}: {w}" not in notes]
    q = fam["lathe_over_bare"]
    lines.append(f"{'bf16: Lathe vs bare':<26}{_fmt(q['step_s'], '.3f', 'x'):>9}{_fmt(q['peak_gpu_mb'], '.3f', 'x'):>14}")
    return "\n".join(lines + (["warnings:"] + notes if notes else []))
