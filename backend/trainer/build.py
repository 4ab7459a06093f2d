"""Everything built before the first step: model, data, caches, the trained modules, optimizer and
schedule. `build_setup` returns the `Setup` the loop, the save points and the state use."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from backend import dataset as D
from backend.config import TrainingConfig
from backend.image_pool import image_threads
from backend.resume import dataset_fingerprint
from backend.trainer import block_swap, evaluation, fp8, models
from backend.trainer.caching import LatentCache, TextEncoder
from backend.trainer.context import Setup
from backend.trainer.distributed import every_rank
from backend.trainer.loss import LossSettingError, check_loss_settings
from backend.trainer.noise import timestep_range
from backend.trainer.optim import build_optimizer, build_scheduler, param_groups
from backend.trainer.run_io import RunIO
from backend.trainer.trained import TEXT_ENCODER, UNET, Trained


def weight_dtype_for(cfg: TrainingConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision, torch.float32)


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a module; cast only when needed (what stays fp32 loads in fp32: models.load_components)."""
    return module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)


def _image_threads(cfg: TrainingConfig, acc: Any) -> int:
    """Threads reading images in this process: its share of its machine's cores."""
    return image_threads(max(1, acc.num_processes // cfg.launch.num_machines))


def build_setup(cfg: TrainingConfig, acc: Any, io: RunIO) -> Setup:
    device = acc.device
    torch.manual_seed(cfg.training.seed + acc.process_index)
    ds = cfg.dataset
    # Data: discovered (every image decoded once, on several threads) while the model loads.
    with ThreadPoolExecutor(1, thread_name_prefix="dataset-scan") as scan:
        found = scan.submit(D.load, ds, cfg.training.seed,
                            threads=_image_threads(cfg, acc))
        wdtype = weight_dtype_for(cfg, device)
        # the denoiser and T5 in the weight dtype; looked up on the module: benchmarks substitute random weights
        comps = models.load_components(cfg, wdtype)
        data = found.result()  # a failed model load waits for the scan (the pool's exit), then is raised
    check_loss_settings(cfg.training, comps.v_prediction)
    timestep_range(cfg.training, comps.noise_scheduler.config.num_train_timesteps)
    if cfg.training.zero_terminal_snr and not comps.v_prediction:
        io.warn("training.zero_terminal_snr: the model is trained with noise prediction (epsilon), where a zero "
                "terminal SNR is not meant to be used (sd-scripts warns the same); v-prediction is")
    for warning in comps.spec.text_warnings(cfg.training):
        io.warn(warning)
    comps.spec.check(cfg, comps)
    comps.spec.export_format(cfg)

    # Data: validation images held out, buckets, plan.
    items, val_items = data.items, data.val_items
    for w in data.warnings:
        io.warn(w)
    buckets = D.buckets_for(ds)
    item_buckets = D.bucket_of_items(items, buckets)
    plan = plan_settings(cfg, acc.num_processes, data.subsets)

    # VAE: fp32 unless bf16 (fp16 VAEs overflow); evaluation images and (when caching) latents encoded once.
    _place(comps.vae, device, torch.bfloat16 if wdtype == torch.bfloat16 else torch.float32)
    eval_kind, eval_list = evaluation.eval_items(items, val_items)
    exchange = gather_object if acc.num_processes > 1 else None  # how the ranks share their caching work
    eval_samples = evaluation.prepare(comps, eval_list, buckets, acc.process_index, acc.num_processes,
                                      exchange)
    cache_reports: list[dict[str, Any]] = []  # `cache_filled` events, emitted after run_started
    flips = (False, True) if any(r.random_flip for r in data.subsets) else (False,)
    latents = (_cache_latents(cfg, acc, comps, items, item_buckets, flips, exchange, cache_reports)
               if ds.cache_latents else None)
    if latents is not None and device.type == "cuda":
        comps.vae.to("cpu")  # not needed until sampling, which borrows it back

    # The trained modules: the network injected, the rest frozen; base weights in weight_dtype.
    train_te = cfg.network.train_text_encoder
    trained_tes = comps.spec.trained_text_encoders(len(comps.text_encoders)) if train_te else []
    for i, te in enumerate(comps.text_encoders):
        _place(te, device, torch.float32 if i in trained_tes else wdtype)
    # blocks_to_swap: the denoiser stays in CPU memory until block_swap.attach places it, so the swapped
    # blocks' weights never sit on the GPU (sd-scripts' move_to_device_except_swap_blocks)
    swap_errors, swap_warnings = block_swap.check(comps.unet, cfg.training.blocks_to_swap, device,
                                                  cfg.training.torch_compile)
    if swap_errors:
        raise LossSettingError("; ".join(swap_errors))
    for w in swap_warnings:
        io.warn(w)
    unet_home = torch.device("cpu") if cfg.training.blocks_to_swap and device.type == "cuda" else device
    if not cfg.model.fp8_base:  # fp8_base: the denoiser moves once it is fp8, after the network is injected
        _place(comps.unet, unet_home, wdtype)
    if device.type == "cuda":
        comps.unet.to(memory_format=torch.channels_last)  # faster convolutions under autocast on tensor cores
    trained = Trained.for_components(cfg, comps)
    if cfg.model.fp8_base:
        report = fp8.store_base_in_fp8(comps.unet, unet_home, wdtype)
        if io.is_main:
            print(report.line(), flush=True)
    # after the network and the fp8 cast, before accelerate wraps the model (DDP's first broadcast skips the placeholders)
    swapper = block_swap.attach(comps.unet, cfg.training.blocks_to_swap, device)  # None when 0 or on the CPU
    if swapper is not None and io.is_main:
        print(swapper.line(), flush=True)
    if cfg.network.network_weights and not cfg.resume_from:  # a resume restores its own state instead
        fresh = trained.start_from(str(Path(cfg.network.network_weights).expanduser()), comps.spec)
        if io.is_main:
            print(f"network.network_weights: started from {cfg.network.network_weights}", flush=True)
        if fresh:
            io.warn(f"network.network_weights: the file holds no weights for {len(fresh)} of the network's modules "
                    f"(e.g. {fresh[0]}); they start fresh")
    if latents is not None:
        _place_latents(cfg, io, latents, device)
    groups = param_groups(cfg, trained.parameters(UNET), trained.parameters(TEXT_ENCODER), trained.up_projections())
    optimizer = trained.prepare(acc, build_optimizer(cfg, groups, device.type), compile_unet=cfg.training.torch_compile)

    # Text: frozen encoders + fixed captions -> every embedding computed once; trained encoders + fixed
    # captions -> the frozen encoders the family can memoize (T5-XXL) run once per caption.
    fixed = not any(r.shuffle_caption for r in data.subsets)
    text = TextEncoder.for_training(comps, cfg.training, cache=not train_te and fixed,
                                    encoders=trained.text_encoder_runners())
    caps = ({it.caption for it in items} | {smp.caption for smp in eval_samples}
            | ({""} if any(r.caption_dropout_rate > 0 for r in data.subsets) else set()))
    memoized = [i for i in comps.spec.memoizable_text_encoders(len(comps.text_encoders)) if i not in trained_tes]
    if text.cache:
        mine = text.precompute(caps, acc.process_index, acc.num_processes, exchange)
        cache_reports.append({"kind": "text", "count": len(text),
                              "encoded_per_rank": every_rank(mine, exchange)})
        if device.type == "cuda":
            for te in comps.text_encoders:
                te.to("cpu")  # every embedding is cached; sampling borrows the encoders back
    elif train_te and fixed and memoized:
        mine = text.memoize_frozen(memoized, caps, acc.process_index, acc.num_processes, exchange)
        cache_reports.append({"kind": "text", "count": len(caps), "encoded_per_rank": every_rank(mine, exchange),
                              "frozen_encoders": memoized})
        if device.type == "cuda":
            for i in memoized:
                comps.text_encoders[i].to("cpu")  # its outputs are memoized (T5-XXL: 9.5 GB); sampling borrows it back

    spe, total_steps, total_epochs = _schedule_length(cfg, items, item_buckets, plan)
    return Setup(cfg=cfg, acc=acc, io=io, comps=comps, items=items, item_buckets=item_buckets, plan=plan,
                 latents=latents, text=text, trained=trained, optimizer=optimizer,
                 lr_scheduler=build_scheduler(cfg, optimizer, total_steps), weight_dtype=wdtype,
                 steps_per_epoch=spe, total_steps=total_steps, total_epochs=total_epochs, eval_kind=eval_kind,
                 eval_samples=eval_samples, dataset_fingerprint=dataset_fingerprint(ds), subsets=data.subsets,
                 cache_reports=cache_reports)


def _cache_latents(cfg: TrainingConfig, acc: Any, comps: models.Components, items: list[D.ImageItem],
                   item_buckets: list[tuple[int, int]], flips: tuple[bool, ...], exchange: Any,
                   reports: list[dict[str, Any]]) -> LatentCache:
    """Fill the latent cache, each rank encoding its share (1/N of what is not on disk yet)."""
    ds = cfg.dataset
    disk = Path(cfg.output_dir) / ".cache" / "latents" if ds.cache_latents_to_disk else None
    latents = LatentCache(comps.vae, items, item_buckets, disk, model_id=comps.source,
                          threads=_image_threads(cfg, acc))
    world = acc.num_processes
    if acc.is_main_process:
        print(f"caching latents for {len(items)} images ({len(flips)} variant(s) each, {world} process(es))", flush=True)
    t0 = time.perf_counter()
    mine, hits = latents.fill(flips, rank=acc.process_index, world=world, exchange=exchange)
    reports.append({"kind": "latents", "count": len(latents.latents), "encoded_per_rank": every_rank(mine, exchange),
                    "from_disk": hits,
                    "bytes": latents.nbytes, "seconds": round(time.perf_counter() - t0, 3)})
    return latents


def _place_latents(cfg: TrainingConfig, io: RunIO, latents: LatentCache, device: torch.device) -> None:
    """Once the model is on the device: the cache goes there too if it fits the budget."""
    if device.type != "cuda":
        return
    budget_mb = cfg.dataset.latent_cache_gpu_mb
    if budget_mb is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = budget_mb * 2**20
    where = latents.place(device, budget)
    if io.is_main:
        print(f"latent cache: {latents.nbytes / 2**20:.1f} MB in {where} memory (budget {budget / 2**20:.0f} MB)", flush=True)
    if where != "gpu":
        io.warn(f"dataset.latent_cache_gpu_mb: the latent cache ({latents.nbytes / 2**20:.0f} MB) is over the GPU "
                f"budget ({budget / 2**20:.0f} MB); it stays in pinned CPU memory and each batch is copied")


def plan_settings(cfg: TrainingConfig, world: int, subsets: list[D.Subset]) -> D.PlanSettings:
    """The batch plan's settings, with each subset's own caption rules."""
    ds, t = cfg.dataset, cfg.training
    return D.PlanSettings(t.seed, D.global_batch(t.train_batch_size, world, t.gradient_accumulation_steps), ds.random_flip,
                          ds.shuffle_caption, ds.keep_tokens, ds.caption_dropout_rate, tuple(subsets), t.prior_loss_weight)


def _schedule_length(cfg: TrainingConfig, items: list[D.ImageItem], item_buckets: list[tuple[int, int]],
                     plan: D.PlanSettings) -> tuple[int, int, int]:
    """(steps per epoch, total steps, total epochs): one step per global batch of the plan."""
    spe = D.steps_per_epoch(items, item_buckets, plan)
    if cfg.training.max_train_steps is not None:
        return spe, cfg.training.max_train_steps, math.ceil(cfg.training.max_train_steps / spe)
    return spe, cfg.training.max_train_epochs * spe, cfg.training.max_train_epochs
