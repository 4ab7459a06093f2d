"""Sample images from the model being trained, with the LoRA active."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backend.config import SamplingConfig
from backend.trainer.models import Components


def _pipeline(comps: Components, unet: Any, text_encoders: list[Any]) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler.from_config(comps.noise_scheduler.config)
    if comps.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=comps.vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=comps.tokenizers[0],
            tokenizer_2=comps.tokenizers[1],
            unet=unet,
            scheduler=sched,
        )
    return StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=text_encoders[0],
        tokenizer=comps.tokenizers[0],
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def generate(
    comps: Components,
    unet: Any,
    text_encoders: list[Any],
    sc: SamplingConfig,
    out_dir: Path,
    device: torch.device,
    autocast: Any,
) -> list[tuple[Path, str]]:
    """One image per prompt into out_dir/<i>.png (plus prompts.json); returns (path, prompt) pairs.

    The training RNG is saved and restored around sampling, so sampling never changes the run.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    modes = [(m, m.training) for m in (unet, *text_encoders)]
    for m, _ in modes:
        m.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = _pipeline(comps, unet, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    results = []
    try:
        for i, prompt in enumerate(sc.prompts):
            gen = torch.Generator("cpu").manual_seed(sc.seed + i)
            with autocast():
                image = pipe(
                    prompt=prompt,
                    negative_prompt=sc.negative_prompt or None,
                    num_inference_steps=sc.steps,
                    guidance_scale=sc.guidance_scale,
                    width=sc.width,
                    height=sc.height,
                    generator=gen,
                ).images[0]
            path = out_dir / f"{i}.png"
            image.save(path)
            results.append((path, prompt))
        (out_dir / "prompts.json").write_text(json.dumps([p for _, p in results], indent=1), encoding="utf-8")
    finally:
        for m, was_training in modes:
            m.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return results
