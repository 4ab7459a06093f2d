"""Sample images from the model being trained, with the network active.

Each prompt line may carry kohya's options (backend.prompts: --n --w --h --s --l --d --ss); what a
line leaves out comes from the sampling section. Every PNG holds its generation parameters in a
`parameters` text chunk, as A1111 writes them (prompt, negative prompt, steps, sampler, CFG scale,
seed, size). Prompts are encoded exactly as training encodes captions (the same function, clip_skip, SDXL's
pooled embedding), and handed to the pipeline as embeddings. The denoising runs under the
training's autocast; the VAE decodes outside it, in its own dtype (an fp32 SDXL VAE run in fp16
gives black or NaN images).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo

from backend.config import SamplingConfig
from backend.prompts import SAMPLERS, PromptSpec, parse_prompt
from backend.trainer.caching import TextEncoder
from backend.trainer.models import Components


def make_sampler(name: str, comps: Components) -> Any:
    """The diffusers scheduler for an sd-scripts sampler name, from the training scheduler's config
    (which carries models.resolve_v_prediction's decision and zero terminal SNR)."""
    import diffusers

    own = comps.spec.sampler(comps)  # a flow-matching family samples with its own scheduler
    if own is not None:
        return own
    cls_name, extra = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(comps.noise_scheduler.config, **extra)


def _pipeline(comps: Components, unet: Any) -> Any:
    return comps.spec.pipeline(comps, unet, make_sampler("ddim", comps))


def prompt_embeddings(comps: Components, text: TextEncoder, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    """The pipeline's embedding arguments for one prompt, encoded as training encodes captions."""
    return comps.spec.prompt_embeddings(comps, text, prompt, negative)


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], outside any autocast, in the VAE's own dtype."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.autocast(latents.device.type, enabled=False):
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(z).sample.float()


def resolved(sc: SamplingConfig, i: int) -> PromptSpec:
    """Prompt i with every setting filled: its own options, else the sampling section's (the seed:
    sampling.seed + i, so an image does not depend on which rank drew it)."""
    p = parse_prompt(sc.prompts[i])
    return PromptSpec(p.prompt, p.negative if p.negative is not None else sc.negative_prompt,
                      p.width or sc.width, p.height or sc.height, p.steps or sc.steps,
                      p.guidance if p.guidance is not None else sc.guidance_scale,
                      p.seed if p.seed is not None else sc.seed + i, p.sampler or sc.sample_sampler)


def parameters_text(p: PromptSpec) -> str:
    """A1111's generation-parameters text for one image."""
    neg = f"\nNegative prompt: {p.negative}" if p.negative else ""
    return (f"{p.prompt}{neg}\nSteps: {p.steps}, Sampler: {p.sampler}, CFG scale: {p.guidance:g}, Seed: {p.seed}, "
            f"Size: {p.width}x{p.height}")


@torch.no_grad()
def generate(comps: Components, unet: Any, text: TextEncoder, sc: SamplingConfig, indices: range | list[int],
             device: torch.device, autocast: Any) -> list[tuple[int, str, bytes]]:
    """The sample images of the prompts at `indices` (one rank's share): (index, prompt, PNG bytes).
    Prompt i uses its --d seed, else sc.seed + i, so an image does not depend on which rank drew it.

    The caller puts the modules in eval mode (Trained.evaluating). The training RNG is saved and
    restored around sampling, so sampling never changes the run.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    pipe = _pipeline(comps, unet)
    pipe.set_progress_bar_config(disable=True)
    results = []
    try:
        for i in indices:
            p = resolved(sc, i)
            pipe.scheduler = make_sampler(p.sampler, comps)
            gen = torch.Generator("cpu").manual_seed(p.seed)
            with autocast():
                embeds = prompt_embeddings(comps, text, p.prompt, p.negative)
                latents = pipe(**embeds, num_inference_steps=p.steps, guidance_scale=p.guidance,
                               width=p.width, height=p.height, generator=gen, output_type="latent").images
            latents = comps.spec.sample_latents(comps, latents, p.height, p.width)
            image = pipe.image_processor.postprocess(decode(comps.vae, latents), output_type="pil")[0]
            info = PngInfo()
            info.add_text("parameters", parameters_text(p))
            buf = io.BytesIO()
            image.save(buf, format="PNG", pnginfo=info)
            results.append((i, sc.prompts[i], buf.getvalue()))
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return results


def write_samples(out_dir: Path, images: list[tuple[int, str, bytes]]) -> list[tuple[Path, str]]:
    """Write out_dir/<i>.png for every image (from every rank) and prompts.json; (path, prompt) pairs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, prompt, png in sorted(images):
        path = out_dir / f"{i}.png"
        path.write_bytes(png)
        results.append((path, prompt))
    (out_dir / "prompts.json").write_text(json.dumps([p for _, p in results], indent=1), encoding="utf-8")
    return results
