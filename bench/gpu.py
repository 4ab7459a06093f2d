"""GPU benchmark: Lathe's trainer against a bare LoRA loop on full-size SD1.5 and SDXL UNets, bf16;
and Lathe's trainer on Flux.1-dev and SD3.5 large under each memory lever.

    .venv/bin/python bench/gpu.py --json gpu.json                # one GPU; under 10 minutes on an H200
    .venv/bin/python bench/gpu.py --models sd15 --steps 30
    .venv/bin/python bench/gpu.py --models flux,sd35 --json flow.json   # the levers; ~6 minutes (estimated)
    .venv/bin/python bench/gpu.py --models all                   # both of the above, one after the other
    .venv/bin/python bench/gpu.py --dry-run --json /tmp/dry.json # tiny shapes on the CPU: checks the harness
    .venv/bin/python bench/gpu.py --dry-run --models flux,sd35   # the same for the levers (under a minute)

Shapes: the SD1.5 UNet at 512 px, batch 4 and 8; the SDXL UNet at 1024 px, batch 1 and 2; built from
the shipped configs (backend/trainer/model_configs/<family>/) with random weights: nothing is
downloaded, and the speed of a step does not depend on the values of the weights.

Two contestants per shape, each in its own process (`--worker`), one after the other:

  bare   the loop anyone would write: the UNet in bf16 (frozen), peft LoRA (rank 16, fp32 weights) on
         Lathe's default targets, fused AdamW, bf16 autocast, random latents [B,4,H/8,W/8] and random
         text context ([B,77,768]; SDXL [B,77,2048] plus pooled text_embeds and time_ids), MSE on
         epsilon, gradient clipping at 1.0 (Lathe's default). Timed between torch.cuda.synchronize
         calls, after the warm-up steps.
  lathe  Lathe's real trainer (backend.trainer.__main__.main, in the worker process) on a generated
         image folder at the bench resolution: latents cached, bf16, same rank, targets, optimizer
         and batch, sampling and state saves off. The model loader is replaced by one that builds the
         same random-weight components. Seconds per step come from its own `step` events (their
         `time` stamps), after the warm-up steps; peak memory from its `run_finished` event.

Reported per shape and contestant: seconds per step, images per second, peak GPU memory
(torch.cuda.max_memory_allocated counted from after the model is built; for Lathe it includes latent
caching and the final export), and MFU: the FLOPs of one forward+backward step (counted once per shape
with torch.utils.flop_counter.FlopCounterMode in the bare worker; frozen weights get no weight
gradients, so this is what a LoRA step really computes) per second, over the device's dense bf16 peak
(PEAK_BF16, by device name; other devices get no MFU). Then lathe/bare ratios per shape. Nothing
here asserts a speed.

Flow families (`--models flux,sd35`, not in the default): Flux.1-dev and SD3.5 large at 1024 px,
batch 1, rank 16, LoRA on the family's default targets, latents and text embeddings cached (the text
encoders do not train, so Lathe encodes every caption once and sends CLIP and T5-XXL back to the CPU).
Lathe's real trainer runs once per memory lever, each lever on top of the one before:

  bf16                     training.mixed_precision bf16
  + gradient_checkpointing training.gradient_checkpointing
  + fp8_base               model.fp8_base (the frozen transformer weights in fp8)
  + blocks_to_swap 18 / 28 training.blocks_to_swap (Flux.1; SD3.5 large: 18 / 32), after sd-scripts'
                           docs/flux_train_network.md 6.1 (18: its example, for 16 GB; 28: its 8 GB row)
                           and docs/sd3_train_network.md (its example swaps 32 of 38 blocks)

and a bare loop (bench/gpu_flow.py: the transformer in bf16, peft LoRA, random latents and text
context, the velocity target) for the bf16 case only, as the reference ratio. Every component (the
transformer, VAE, CLIP-L, CLIP-G for SD3, T5-XXL) is built from the shipped configs
(model_configs/flux-dev/, sd3.5-large/, t5_tokenizer/) with random weights directly on the GPU in
bf16, so a build takes seconds, not the minutes a 12B model initialized on the CPU would; under
fp8_base and blocks_to_swap the transformer then goes to the CPU, where a real load leaves it, so
that the cast and the swap start where they start in a real run. Reported per lever: s/step, the
peak GPU memory of training (torch.cuda.max_memory_allocated from the first step through the final
export) and of setup (placement, latent and text caching: T5-XXL is on the GPU then), MFU from the
bare loop's FLOP count, and the ratios to the bf16 case. Defaults: 3 warm-up + 5 timed steps.

Cost on one H200 (estimated, not measured yet): each lever is a process of 25-65 s (start-up and
imports ~10 s, the random build ~5 s, moving 24 GB to the CPU and the fp8 cast there ~15 s under
fp8_base, pinning the swapped blocks, 8 steps of 0.5-3 s), so Flux.1 ~4 minutes with its bare loop
and SD3.5 large ~3, about 6-7 minutes for `--models flux,sd35`: run one family per device call if
time is short. Host memory: ~40 GB (the transformer and T5-XXL parked on the CPU, pinned copies of
the swapped blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "backend" / "trainer" / "model_configs"

from bench import bare_loop, gpu_flow  # noqa: E402  (after the path: bench/ runs as a script)

RANK, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 16, 1e-4, 0.01, 1.0
RESULT = "BENCH_RESULT "  # prefix of the one stdout line a worker reports with
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("RTX 4090", 165e12))

# Tiny stand-ins for --dry-run (the demo model's sizes), laid over the shipped configs.
TINY_UNET = {
    "sd15": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "sdxl": {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 1], "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8},
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32}
TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}


@dataclass(frozen=True)
class Shape:
    model: str  # sd15 | sdxl | flux | sd35
    resolution: int
    batch: int
    lever: str = ""  # flow families: the gpu_flow.Lever key

    @property
    def label(self) -> str:
        return f"{self.model} {self.resolution}px b{self.batch}" + (f" {self.lever}" if self.lever else "")

    @property
    def flow(self) -> bool:
        return self.model in gpu_flow.MODELS


def _lever_shapes(model: str, resolution: int, dry: bool) -> list[Shape]:
    return [Shape(model, resolution, 1, lv.key) for lv in gpu_flow.levers(model, dry)]


FULL = {"sd15": [Shape("sd15", 512, 4), Shape("sd15", 512, 8)], "sdxl": [Shape("sdxl", 1024, 1), Shape("sdxl", 1024, 2)],
        **{m: _lever_shapes(m, 1024, False) for m in gpu_flow.MODELS}}
DRY = {"sd15": [Shape("sd15", 64, 2)], "sdxl": [Shape("sdxl", 64, 1)], **{m: _lever_shapes(m, 64, True) for m in gpu_flow.MODELS}}


# ------------------------------------------------------------------------------ random-weight models
def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def unet_config(family: str, dry: bool) -> dict[str, Any]:
    cfg = _json(CONFIGS / family / "unet" / "config.json")
    return {**cfg, **TINY_UNET[family]} if dry else cfg


def _frozen(module: Any, dtype: Any) -> Any:
    return module.to(dtype).requires_grad_(False).eval()


def build_unet(family: str, dry: bool, device: Any, dtype: Any) -> Any:
    """The UNet from the shipped config, random weights, built directly on `device` (fast init)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return _frozen(UNet2DConditionModel.from_config(unet_config(family, dry)), dtype)


def random_components(cfg: Any, dry: bool) -> Any:
    """Stand-in for backend.trainer.models.load_components: every component of `cfg.model.family`
    from the shipped configs with random weights, built on the training device and cast to the dtype
    the trainer would cast them to (bf16 on CUDA). The peak-memory counter starts after this, as a
    real load (on the CPU, the denoiser in the weight dtype, the rest cast on the way) leaves no copy on the GPU."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from backend.trainer.clip_tokenizer import load_tokenizer
    from backend.trainer.models import Components

    if cfg.model.family in gpu_flow.FAMILY.values():
        return gpu_flow.flow_components(cfg, dry)
    family, cuda = cfg.model.family, cfg.launch.device == "cuda"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    folder = CONFIGS / family
    unet = build_unet(family, dry, device, dtype)
    vae_cfg = {**_json(folder / "vae" / "config.json"), **(TINY_VAE if dry else {})}
    with torch.device(device):
        vae = _frozen(AutoencoderKL.from_config(vae_cfg), dtype)
    tes, toks = [], []
    for i, name in enumerate(["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]):
        te_cfg = CLIPTextConfig.from_dict({**_json(folder / name / "config.json"), **(TINY_TEXT if dry else {})})
        with torch.device(device):
            tes.append(_frozen((CLIPTextModelWithProjection if i else CLIPTextModel)(te_cfg), dtype))
        toks.append(load_tokenizer(folder / ("tokenizer_2" if i else "tokenizer")))
    sched = DDPMScheduler.from_config(_json(folder / "scheduler" / "scheduler_config.json"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # count training, not this builder's transient fp32 init
    return Components(family=family, v_prediction=False, unet=unet, vae=vae, noise_scheduler=sched, text_encoders=tes,
                      tokenizers=toks, source=f"random:{family}:{'tiny' if dry else 'full'}")


# ------------------------------------------------------------------------------------ bare worker
def _device_info() -> tuple[Any, str, float | None]:
    """(device, its name, its dense bf16 peak in FLOP/s or None when not in PEAK_BF16)."""
    import platform

    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu"), f"cpu ({platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name(0)
    return torch.device("cuda"), name, next((p for key, p in PEAK_BF16 if key.lower() in name.lower()), None)


def bare_worker(shape: Shape, steps: int, warmup: int, dry: bool) -> dict[str, Any]:
    """The reference loop; also counts the FLOPs of one forward+backward step."""
    if shape.flow:
        return gpu_flow.bare_worker(shape.model, shape.resolution, shape.batch, steps, warmup, dry, _device_info,
                                    RANK, LR, WEIGHT_DECAY, MAX_GRAD_NORM)
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from backend.config import UNET_TARGETS_DEFAULT

    device, name, peak = _device_info()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ucfg = unet_config(shape.model, dry)
    unet = build_unet(shape.model, dry, device, dtype)
    params = bare_loop.inject_lora(unet, list(UNET_TARGETS_DEFAULT), RANK)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=cuda)
    sched = DDPMScheduler.from_config(_json(CONFIGS / shape.model / "scheduler" / "scheduler_config.json"))
    b, lat_side = shape.batch, shape.resolution // 8
    ctx = torch.randn(b, 77, ucfg["cross_attention_dim"], device=device, dtype=dtype)
    added = None
    if shape.model == "sdxl":
        pooled = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]
        r = shape.resolution
        added = {"text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, device=device, dtype=dtype)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def forward_backward() -> torch.Tensor:
        lat = torch.randn(b, 4, lat_side, lat_side, device=device)
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = unet(sched.add_noise(lat, noise, t).to(dtype), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        return loss.detach()

    return bare_loop.time_steps(forward_backward, params, opt, MAX_GRAD_NORM, steps, warmup, b, cuda, name, peak)


# ----------------------------------------------------------------------------------- Lathe worker
def write_images(folder: Path, shape: Shape, total_steps: int, count: int = 4) -> Path:
    """A kohya-layout folder (`<repeats>_bench/`) of `count` noise PNGs at the bench resolution with
    captions, repeated so that one epoch holds every step."""
    import numpy as np
    from PIL import Image

    repeats = math.ceil(total_steps * shape.batch / count) + 1
    sub = folder / f"{repeats}_bench"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (shape.resolution, shape.resolution, 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"img_{i}.png")
        (sub / f"img_{i}.txt").write_text(f"a photo of bench image number {i}\n", encoding="utf-8")
    return folder


def lathe_config(shape: Shape, total_steps: int, dry: bool, root: Path) -> dict[str, Any]:
    """A sparse config: Lathe's defaults plus the bench shape (and its lever); nothing saved or sampled mid-run."""
    res = shape.resolution
    cfg = {
        "run_name": f"bench-{shape.model}-{res}-b{shape.batch}" + (f"-{shape.lever}" if shape.lever else ""),
        "output_dir": str(root / "runs"),
        "model": {"pretrained_model": str(CONFIGS / shape.model), "family": shape.model},
        "dataset": {"train_data_dir": str(write_images(root / f"images-{shape.model}-{res}-b{shape.batch}", shape, total_steps)),
                    "resolution": res, "enable_bucket": False, "min_bucket_reso": min(256, res),
                    "max_bucket_reso": max(1024, res), "cache_latents": True, "random_flip": False},
        "network": {"rank": RANK, "alpha": RANK},
        "optimizer": {"type": "AdamW", "learning_rate": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM},
        "training": {"max_train_steps": total_steps, "train_batch_size": shape.batch, "seed": 0,
                     "mixed_precision": "no" if dry else "bf16", "torch_compile": False},
        "saving": {"save_every_n_epochs": None, "save_every_n_steps": None, "save_state": False, "save_on_stop": False},
        "sampling": {"prompts": []},
        "logging": {"tensorboard": False, "log_every_n_steps": 100_000},
        "launch": {"device": "cpu" if dry else "cuda"},
    }
    if shape.flow:
        for section, values in gpu_flow.config_overrides(shape.model, gpu_flow.lever(shape.model, shape.lever, dry),
                                                          dry).items():
            cfg[section] = {**cfg[section], **values}
    return cfg


def install_loader(dry: bool) -> None:
    """Make the trainer build random-weight components instead of reading a model folder: replace
    backend.trainer.models.load_components, and any binding of it already imported elsewhere."""
    import backend.trainer.models as models

    original = models.load_components

    def loader(cfg: Any, dtype: Any = None) -> Any:  # random_components casts as the trainer would
        return random_components(cfg, dry)

    for name, module in list(sys.modules.items()):
        if name.startswith("backend.trainer") and getattr(module, "load_components", None) is original:
            module.load_components = loader


def lathe_worker(shape: Shape, steps: int, warmup: int, dry: bool, root: Path) -> dict[str, Any]:
    """Lathe's trainer in this process on the bench shape, timed from its own step events."""
    from backend import runs
    from backend.presets import resolve
    from backend.trainer.__main__ import main

    install_loader(dry)
    setup = gpu_flow.split_setup_peak() if shape.flow else {}
    cfg = resolve(lathe_config(shape, warmup + steps, dry, root))
    version = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    runs.write_run_files(version, cfg, [sys.executable, *sys.argv])
    runs.new_status(version)
    code = main(["--run-dir", str(version)])
    evs = [json.loads(x) for x in (version / "events.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    fin = next((e for e in evs if e["event"] == "run_finished"), {})
    if code != 0 or fin.get("state") != "finished":
        raise RuntimeError(f"Lathe's trainer ended {fin.get('state')!r} (exit {code}): {fin.get('error')}")
    step_events = sorted((e for e in evs if e["event"] == "step"), key=lambda e: e["step"])
    # `time` is stamped on the host after each step is queued; the GPU's queue bounds how far the
    # host runs ahead, so over the timed window the differences are the GPU's time per step.
    timed = [e for e in step_events if e["step"] > warmup]
    start = next(e for e in step_events if e["step"] == warmup)
    step_s = (timed[-1]["time"] - start["time"]) / len(timed)
    per_step = sorted(shape.batch / e["samples_per_s"] for e in timed)
    _, name, _ = _device_info()
    out = {"contestant": "lathe", "device": name, "step_s": step_s, "images_per_s": shape.batch / step_s,
           "step_s_median_events": per_step[len(per_step) // 2], "timed_steps": len(timed),
           "final_loss": timed[-1]["loss"], "peak_gpu_mb": fin.get("peak_gpu_mb"),
           "peak_rss_mb": fin.get("peak_ram_mb")}
    if shape.flow:  # the counter restarted after setup: run_finished's peak is training's
        train_peak, setup_peak = fin.get("peak_gpu_mb"), setup.get("setup_peak_gpu_mb")
        out.update(lever=shape.lever, train_peak_gpu_mb=train_peak, setup_peak_gpu_mb=setup_peak,
                   peak_gpu_mb=max(train_peak, setup_peak) if train_peak and setup_peak else train_peak,
                   warnings=[e["message"] for e in evs if e["event"] == "warning"])
    return out


# ------------------------------------------------------------------------------------------ parent
def run_worker(jobs: list[tuple[Shape, str]], args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Jobs (contestant on shape; the same model, resolution and batch) in one fresh process, one
    after the other; each job's report, or {"error": ...} for those that did not report."""
    first = jobs[0][0]
    steps, warmup = (args.flow_steps, args.flow_warmup) if first.flow else (args.steps, args.warmup)
    name = f"{jobs[0][1]}-{first.model}-{first.resolution}-b{first.batch}" + (f"-{first.lever}" if first.lever else "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(kind for _, kind in jobs),
           "--model", first.model, "--resolution", str(first.resolution), "--batch", str(first.batch),
           "--steps", str(steps), "--warmup", str(warmup), "--root", str(root / name)]
    if first.flow:
        cmd += ["--lever", ",".join(shape.lever for shape, _ in jobs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        cmd.append("--dry-run")
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
        lines = [ln.split(RESULT, 1)[1] for ln in out.stdout.splitlines() if RESULT in ln]  # after a progress bar's \r
        tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-15:]
        error = f"exit {out.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        lines, error = [], f"timed out after {args.worker_timeout} s"
    wall = round(time.perf_counter() - t0, 1)
    done = [{**json.loads(line), "process_wall_s": wall} for line in lines[:len(jobs)]]
    return done + [{"contestant": kind, "error": error} for _, kind in jobs[len(done):]]


def shape_report(shape: Shape, bare: dict[str, Any], lathe: dict[str, Any]) -> dict[str, Any]:
    """MFU for both from the bare worker's FLOP count, and the lathe/bare ratios."""
    flops, peak = bare.get("flops_per_step"), bare.get("peak_bf16_flops")
    for r in (bare, lathe):
        ok = flops and peak and r.get("step_s")
        r["mfu"] = flops / r["step_s"] / peak if ok else None
    ratios = {}
    for key in ("step_s", "peak_gpu_mb", "peak_rss_mb"):
        a, b = lathe.get(key), bare.get(key)
        ratios[key] = a / b if a and b else None
    return {**asdict(shape), "label": shape.label, "flops_per_step": flops, "bare": bare, "lathe": lathe,
            "lathe_over_bare": ratios}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(report: dict[str, Any]) -> str:
    peak = report.get("peak_bf16_flops")
    lines = [f"device: {report['device']} (dense bf16 peak: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'})"
             f"   torch {report['torch']}{'   DRY RUN (tiny shapes, CPU)' if report['dry_run'] else ''}",
             f"{'shape':<18}{'contestant':<12}{'s/step':>10}{'images/s':>10}{'peak GPU MB':>13}{'peak RSS MB':>13}{'MFU':>8}"]
    for s in report["shapes"]:
        for kind in ("bare", "lathe"):
            r = s[kind]
            if "error" in r:
                lines.append(f"{s['label']:<18}{kind:<12}FAILED: {r['error'][:200]}")
                continue
            mfu = _fmt(r["mfu"] * 100 if r.get("mfu") else None, ".1f", "%")
            lines.append(f"{s['label']:<18}{kind:<12}{r['step_s']:>10.4f}{r['images_per_s']:>10.2f}"
                         f"{_fmt(r.get('peak_gpu_mb'), '.0f'):>13}{_fmt(r.get('peak_rss_mb'), '.0f'):>13}{mfu:>8}")
        q = s["lathe_over_bare"]
        lines.append(f"{'':<18}{'lathe/bare':<12}{_fmt(q['step_s'], '.3f', 'x'):>10}{'':>10}"
                     f"{_fmt(q['peak_gpu_mb'], '.3f', 'x'):>13}{_fmt(q['peak_rss_mb'], '.3f', 'x'):>13}")
    return "\n".join(lines)


def jobs_for(shapes: list[Shape]) -> list[tuple[Shape, str]]:
    """Both contestants on each SD shape; Lathe on each lever of a flow family, and the bare loop on
    its bf16 lever (the reference)."""
    jobs = []
    for shape in shapes:
        kinds = ("bare", "lathe") if not shape.flow or shape.lever == "bf16" else ("lathe",)
        jobs += [(shape, kind) for kind in kinds]
    return jobs


def process_groups(jobs: list[tuple[Shape, str]], dry: bool) -> list[list[tuple[Shape, str]]]:
    """The jobs each process runs: one job per process (a fresh CUDA context and peak counter), except
    a flow family's jobs in a dry run, which share one (there the imports cost more than the tiny runs)."""
    if not dry:
        return [[job] for job in jobs]
    groups: dict[str, list[tuple[Shape, str]]] = {}
    for shape, kind in jobs:
        groups.setdefault(shape.model if shape.flow else shape.label + kind, []).append((shape, kind))
    return list(groups.values())


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every job in its own process (process_groups): one after the other on the GPU; two at a time in
    a dry run (tiny CPU work, where process start-up dominates)."""
    shapes = [sh for m in args.models for sh in (DRY if args.dry_run else FULL)[m]]
    jobs = jobs_for(shapes)
    report: dict[str, Any] = {"dry_run": args.dry_run, "steps": args.steps, "warmup": args.warmup,
                              "flow_steps": args.flow_steps, "flow_warmup": args.flow_warmup, "shapes": [],
                              "levers": [], "device": None, "peak_bf16_flops": None, "torch": None}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lathe-gpu-bench-") as tmp:

        def one(group: list[tuple[Shape, str]]) -> list[dict[str, Any]]:
            print(", ".join(f"{shape.label}: {kind}" for shape, kind in group) + " ...", file=sys.stderr, flush=True)
            return run_worker(group, args, Path(tmp))

        with ThreadPoolExecutor(max_workers=2 if args.dry_run else 1) as pool:
            groups = process_groups(jobs, args.dry_run)
            results = {job: r for group, rs in zip(groups, pool.map(one, groups), strict=True)
                       for job, r in zip(group, rs, strict=True)}
    for r in results.values():
        for key in ("device", "peak_bf16_flops", "torch"):
            report[key] = report[key] or r.get(key)
    for shape in (sh for sh in shapes if not sh.flow):
        report["shapes"].append(shape_report(shape, results[(shape, "bare")], results[(shape, "lathe")]))
    for model in (m for m in args.models if m in gpu_flow.MODELS):
        mine = [sh for sh in shapes if sh.model == model]
        bare = next(results[(sh, "bare")] for sh in mine if (sh, "bare") in results)
        report["levers"].append(gpu_flow.lever_report(model, mine[0].resolution, mine[0].batch, bare,
                                                      [(sh.lever, results[(sh, "lathe")]) for sh in mine], args.dry_run))
    report["wall_s"] = round(time.time() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for what is measured.")
    ap.add_argument("--models", default="sd15,sdxl",
                    help="comma-separated: sd15, sdxl, flux (Flux.1-dev, its memory levers), sd35 (SD3.5 large, its "
                    "memory levers), or all (default sd15,sdxl)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per contestant and shape (default 20; flux and "
                    "sd35 5; dry run 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps before them (default 5; flux and sd35 3; dry run 1)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, to check the harness (no GPU needed)")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    ap.add_argument("--worker-timeout", type=float, default=480, help="seconds before a worker process is abandoned")
    for flag, kind in (("--worker", str), ("--model", str), ("--root", Path), ("--resolution", int), ("--batch", int),
                       ("--lever", str)):
        ap.add_argument(flag, type=kind, help=argparse.SUPPRESS)  # a worker process's own arguments
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.models = list(FULL) if args.models == ["all"] else args.models
    unknown = [m for m in args.models if m not in FULL]
    if unknown or not args.models:
        ap.error(f"--models: use sd15, sdxl, flux, sd35 or all (got {unknown or 'nothing'})")
    given_steps, given_warmup = args.steps, args.warmup
    args.steps = given_steps if given_steps is not None else (3 if args.dry_run else 20)
    args.warmup = given_warmup if given_warmup is not None else (1 if args.dry_run else 5)
    args.flow_steps = given_steps if given_steps is not None else (3 if args.dry_run else 5)
    args.flow_warmup = given_warmup if given_warmup is not None else (1 if args.dry_run else 3)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1 (the first step is never timed)")
    return args


def failures(report: dict[str, Any]) -> list[str]:
    failed = [f"{s['label']} {k}" for s in report["shapes"] for k in ("bare", "lathe") if "error" in s[k]]
    for fam in report["levers"]:
        failed += [f"{fam['model']} bare"] if "error" in fam["bare"] else []
        failed += [f"{fam['model']} {lv['key']}" for lv in fam["levers"] if "error" in lv["lathe"]]
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        import torch

        kinds = args.worker.split(",")
        lever_keys = args.lever.split(",") if args.lever else [""] * len(kinds)
        for i, (kind, key) in enumerate(zip(kinds, lever_keys, strict=True)):
            shape = Shape(args.model, args.resolution, args.batch, key)
            if kind == "bare":
                result = bare_worker(shape, args.steps, args.warmup, args.dry_run)
            else:
                result = lathe_worker(shape, args.steps, args.warmup, args.dry_run, args.root / str(i))
            print("\n" + RESULT + json.dumps({**result, "torch": torch.__version__}), flush=True)
        return 0
    report = run_bench(args)
    device = f"device: {report['device']}   torch {report['torch']}{'   DRY RUN (tiny shapes, CPU)' if report['dry_run'] else ''}"
    print("\n\n".join(filter(None, [table(report) if report["shapes"] else device,
                                     *(gpu_flow.lever_table(fam) for fam in report["levers"])])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    failed = failures(report)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
