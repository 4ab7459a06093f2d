"""The model-family seam: what differs between the families Lathe trains sits behind one small
interface (`base.ModelFamily`), one implementation per family, looked up by the family's name.

Everything else (the recipe, the state and its checkpoints, save points, rotation, resume, verify,
DDP, the GUI and presets) reads a family only through this interface. SD 1.x, SD 2.x and SDXL are
`sd.StableDiffusion` (UNet, DDPM noise schedule, CLIP text encoders); SD3/SD3.5 is `sd3` (MMDiT,
flow matching, CLIP-L + CLIP-G + T5); Flux.1 dev/schnell is `flux` (double/single-stream transformer,
flow matching, CLIP-L + T5)."""

from __future__ import annotations

from backend.trainer.families.base import ModelFamily
from backend.trainer.families.flux import FLUX
from backend.trainer.families.sd import SD2, SD15, SDXL
from backend.trainer.families.sd3 import SD3

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SD2, SDXL, SD3, FLUX)}


def family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; Lathe trains {', '.join(FAMILIES)}") from None
