"""Sample prompts in kohya's syntax (sd-scripts' line_to_prompt_dict): each line's options reach the
image (size, seed, steps, sampler), visible in the PNG and its A1111 parameters text."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from backend.config import ConfigError, TrainingConfig, validate_config
from backend.prompts import SAMPLERS, PromptError, PromptSpec, parse_prompt


def test_options_parse_as_sd_scripts_reads_them():
    assert parse_prompt("a cat, sitting --n blurry, dark --w 700 --h 96 --s 5000 --l 6.5 --d 3 --ss Euler_A") == \
        PromptSpec("a cat, sitting", "blurry, dark", 696, 96, 1000, 6.5, 3, "euler_a")  # 700 -> 696, steps capped
    assert parse_prompt("plain") == PromptSpec("plain")
    assert parse_prompt("tiny --w 30").width == 64  # at least 64, as sd-scripts
    with pytest.raises(PromptError, match=r"unknown option --x; the options are --n \(negative prompt\)"):
        parse_prompt("a --x 1")
    with pytest.raises(PromptError, match=r"--g \(a distilled guidance scale \(Flux\)\) is not an option"):
        parse_prompt("a --g 3.5")
    with pytest.raises(PromptError, match="--ss: unknown sampler 'plms'"):
        parse_prompt("a --ss plms")


def test_a_bad_prompt_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as e:
        validate_config({"sampling": {"prompts": ["fine --w 64", "bad --h tall"]}})
    assert e.value.lines == ["sampling.prompts: prompt 2 ('bad --h tall'): --h (height) must be a number; got 'tall'"]


def test_each_prompts_options_reach_its_image(demo, tmp_path):
    from backend.presets import resolve
    from backend.trainer import models, sampling
    from backend.trainer.caching import TextEncoder
    from tests.conftest import demo_config

    cfg = resolve(demo_config(demo, tmp_path / "runs"))
    comps = models.load_components(cfg)
    text = TextEncoder(comps, 1, cache=False)
    names = list(dict.fromkeys(cls for cls, _ in SAMPLERS.values()))  # every scheduler class once
    by_class = {cls: next(n for n, (c, _) in SAMPLERS.items() if c == cls) for cls in names}
    prompts = [f"a yellow star --w 64 --h 96 --d {7 + i} --s 2 --ss {name}" for i, name in enumerate(by_class.values())]
    prompts.append("a red circle --n blue --l 3")
    sc = cfg.sampling.model_copy(update={"prompts": prompts, "steps": 2, "width": 96, "height": 64, "seed": 40})
    out = sampling.generate(comps, comps.unet, text, sc, range(len(prompts)), torch.device("cpu"),
                            lambda: torch.autocast("cpu", enabled=False))
    for i, prompt, png in out:
        image = Image.open(io.BytesIO(png))
        params = image.text["parameters"]
        if i < len(by_class):
            name = list(by_class.values())[i]
            assert image.size == (64, 96) and prompt == prompts[i]
            assert params == f"a yellow star\nSteps: 2, Sampler: {name}, CFG scale: 7, Seed: {7 + i}, Size: 64x96"
        else:  # no size or seed options: the section's size, seed + index
            assert image.size == (96, 64)
            assert params == (f"a red circle\nNegative prompt: blue\nSteps: 2, Sampler: ddim, CFG scale: 3, "
                              f"Seed: {40 + i}, Size: 96x64")
    again = sampling.generate(comps, comps.unet, text, sc, [0], torch.device("cpu"),
                              lambda: torch.autocast("cpu", enabled=False))
    assert again[0][2] == out[0][2]  # the --d seed makes the image reproducible
    assert TrainingConfig(sampling={"sample_sampler": "dpm++ 2m karras"}).sampling.sample_sampler == "dpm++ 2m karras"
