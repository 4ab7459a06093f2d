"""Sample prompts in kohya's syntax, and the sampler names sd-scripts knows. Torch-free: the config
validates prompts with it, the trainer samples with it.

A prompt line is the prompt, then options, each ` --X value` (sd-scripts' `line_to_prompt_dict`,
library/train_util.py): `--n` negative prompt, `--w`/`--h` size (rounded down to a multiple of 8, at
least 64, as sd-scripts' sample_image_inference does), `--s` steps (1 to 1000), `--l` guidance scale,
`--d` seed, `--ss` sampler. An option a line leaves out takes the sampling section's setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# sd-scripts' sample_sampler names (get_my_scheduler), plus the A1111 names of the two multistep
# DPM++ samplers users ask for -> (diffusers scheduler class, its extra init arguments)
SAMPLERS: dict[str, tuple[str, dict[str, object]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion's own PNDM config
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++ 2m karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps", "l": "guidance scale", "d": "seed",
           "ss": "sampler"}
NOT_HERE = {"g": "a distilled guidance scale (Flux)", "cn": "a ControlNet image", "ctr": "CFG truncation",
            "rcfg": "CFG renormalization", "fs": "a flow shift"}  # sd-scripts options for other models


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None


class PromptError(ValueError):
    pass


def _size(v: str) -> int:
    n = int(v)
    return max(64, n - n % 8)


def parse_prompt(line: str) -> PromptSpec:
    """One prompt line as sd-scripts reads it; PromptError naming a bad or unknown option."""
    prompt, *parts = line.split(" --")
    values: dict[str, object] = {}
    for part in parts:
        flag, _, value = part.strip().partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag in NOT_HERE:
            raise PromptError(f"--{flag} ({NOT_HERE[flag]}) is not an option of these models")
        if flag not in OPTIONS:
            raise PromptError(f"unknown option --{flag}; the options are " + ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items()))
        if not value:
            raise PromptError(f"--{flag} needs a value ({OPTIONS[flag]})")
        try:
            if flag in ("w", "h"):
                values[flag] = _size(re.fullmatch(r"\d+", value).group(0))  # type: ignore[union-attr]
            elif flag in ("s", "d"):
                n = int(re.fullmatch(r"\d+", value).group(0))  # type: ignore[union-attr]
                values[flag] = max(1, min(1000, n)) if flag == "s" else n
            elif flag == "l":
                values[flag] = float(re.fullmatch(r"[\d.]+", value).group(0))  # type: ignore[union-attr]
            else:
                values[flag] = value
        except (AttributeError, ValueError):
            raise PromptError(f"--{flag} ({OPTIONS[flag]}) must be a number; got {value!r}") from None
    sampler = values.get("ss")
    if sampler is not None and str(sampler).lower() not in SAMPLERS:
        raise PromptError(f"--ss: unknown sampler {sampler!r}; one of {', '.join(SAMPLERS)}")
    return PromptSpec(prompt.strip(), values.get("n"), values.get("w"), values.get("h"), values.get("s"),  # type: ignore[arg-type]
                      values.get("l"), values.get("d"), str(sampler).lower() if sampler else None)  # type: ignore[arg-type]
