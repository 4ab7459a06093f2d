"""The combination campaign (bench/combos.py, tests/test_combos.py): settings that each work alone
may break together, so train the demo under a pairwise-covering set of combinations and check for
each what a user relies on:

* a resume from a step checkpoint in the middle of an epoch logs per-step losses bit-identical to
  the straight run's, and ends with a bit-identical exported LoRA;
* `python -m backend verify` passes for every checkpoint folder of both runs;
* with 2 processes every trainable tensor is identical on both ranks at the end;
* the model family is detected and v-prediction is used when the model (or the setting) says so.

The factor space and its constraints are here; the covering generator is tests/pairwise.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backend import launcher, runs
from backend.config import TrainingConfig
from backend.presets import resolve
from tests import pairwise
from tests.conftest import demo_config, events, run_cli, step_losses

Combo = dict[str, Any]

# Each factor's first level is the demo preset's own setting, so describe() shows only what differs.
# AdamW8bit is left out: bitsandbytes' 8-bit optimizers need CUDA (and the package), and this
# campaign runs on CPUs.
SPACE: pairwise.Space = {
    "model": ["sd15", "sd15-file", "sdxl", "sd2v", "sd3", "flux"],
    "network.type": ["lora", "locon", "loha", "lokr", "dora"],
    "network.conv_rank": [0, 2],  # the ResNet blocks' 3x3 convolutions (locon always has them)
    "network.use_tucker": [False, True],  # loha, lokr with conv_rank
    "network.lokr_factor": [-1, 4],
    "network.decompose_both": [False, True],
    "network.train_text_encoder": [False, True],
    "network.dropout": [0.0, 0.1],
    "network.rank_dropout": [0.0, 0.1],  # lora, locon, dora
    "network.module_dropout": [0.0, 0.2],
    "network.alpha": [4.0, 2.0],  # rank stays 4: alpha == rank, and alpha != rank (scale 0.5)
    "training.gradient_accumulation_steps": [1, 2],
    "training.train_batch_size": [4, 1, 2],
    "dataset.cache_latents": [True, False],
    "captions": ["none", "shuffle", "dropout", "all"],
    "dataset.random_flip": [False, True],
    "dataset.enable_bucket": [True, False],
    "dataset.validation_split": [0.0, 0.25],
    "training.clip_skip": [1, 2],
    "training.max_token_length": [75, 150],
    "training.noise_offset": [0.0, 0.05],
    "training.min_snr_gamma": [None, 5.0],
    # Noise, timesteps and loss as sd-scripts has them (docs/training.md).
    "training.noise_offset_random_strength": [False, True],
    "training.adaptive_noise_scale": [None, 0.01],
    "training.multires_noise_iterations": [0, 4],
    "training.ip_noise_gamma": [None, 0.1],
    "training.ip_noise_gamma_random_strength": [False, True],
    "training.min_timestep": [None, 100],
    "training.max_timestep": [None, 900],
    "training.loss_type": ["l2", "huber", "smooth_l1", "l1"],
    "training.huber_schedule": ["snr", "exponential", "constant"],
    "training.debiased_estimation_loss": [False, True],
    "training.zero_terminal_snr": [False, True],
    "training.scale_weight_norms": [None, 0.02],  # small enough that the demo's layers reach it
    "v_pred_loss": ["none", "scale_like_noise", "like_loss"],
    "model.v_parameterization": [None, True],
    "model.fp8_base": [False, True],  # the frozen denoiser weights in fp8, upcast per layer
    "optimizer.type": ["AdamW", "Prodigy", "DAdaptAdam", "DAdaptLion", "Lion", "Adafactor", "SGD"],
    "optimizer.loraplus_lr_ratio": [None, 16.0],  # LoRA+ (lora, locon, dora)
    "scheduler.type": ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"],
    "scheduler.warmup_steps": [0, 2],
    # Flow matching (SD3, Flux.1): how noise levels are drawn and weighted, how Flux.1's output is read.
    "training.timestep_sampling": ["sigma", "shift", "flux_shift", "sigmoid", "uniform"],  # Flux.1 reads it
    "training.weighting_scheme": ["uniform", "logit_normal", "mode", "sigma_sqrt"],
    "training.model_prediction_type": ["raw", "sigma_scaled", "additive"],  # Flux.1 reads it
    "launch.num_processes": [1, 2],
    # CPU threads per process: the demo's own choice (1, its step is tiny) or 2 (torch's parallel kernels).
    "launch.num_cpu_threads_per_process": [None, 2],
}
MODELS = {"sd15": "model", "sd15-file": "model.safetensors", "sdxl": "model-sdxl", "sd2v": "model-sd2v", "sd3": "model-sd3",
          "flux": "model-flux"}
FAMILY = {"sd15": "sd15", "sd15-file": "sd15", "sdxl": "sdxl", "sd2v": "sd2", "sd3": "sd3", "flux": "flux"}
FLOW_MODELS = {"sd3", "flux"}  # flow matching: a plain LoRA on the transformer, none of the DDPM-schedule options
FLOW_ONLY = {"training.weighting_scheme": "uniform"}  # off (at their defaults) for the DDPM models
FLUX_ONLY = {"training.timestep_sampling": "sigma", "training.model_prediction_type": "raw"}
DDPM_ONLY = {"training.min_snr_gamma": None, "training.zero_terminal_snr": False, "training.debiased_estimation_loss": False,
             "v_pred_loss": "none", "training.noise_offset": 0.0, "training.adaptive_noise_scale": None,
             "training.multires_noise_iterations": 0, "model.v_parameterization": None, "network.type": "lora",
             "network.conv_rank": 0, "network.use_tucker": False,
             "network.lokr_factor": -1, "network.decompose_both": False,
             "training.noise_offset_random_strength": False}
SCHEDULER_V_PREDICTION = {"sd2v"}  # the models whose scheduler config says v_prediction
CAPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "shuffle": {"shuffle_caption": True, "keep_tokens": 1},
    "dropout": {"caption_dropout_rate": 0.2},
    "all": {"shuffle_caption": True, "keep_tokens": 1, "caption_dropout_rate": 0.2},
}
V_PRED_LOSS: dict[str, dict[str, Any]] = {  # sd-scripts' v-prediction loss scalings, each for one prediction type
    "none": {},
    "scale_like_noise": {"scale_v_pred_loss_like_noise_pred": True},  # v-prediction only
    "like_loss": {"v_pred_like_loss": 0.1},  # noise prediction only
}
RESUME_STEPS = (4, 3, 5)  # the step save point: the first of these that is not an epoch boundary
STEPS_AFTER_RESUME = 2
RUN_TIMEOUT_S = 600.0
CHECKS = ("straight_finished", "resume_finished", "family", "v_prediction", "losses_bit_exact",
          "exports_identical", "verify_all", "ranks_identical")


NO_DROPOUT = {"loha", "lokr"}  # types without kohya's network_dropout and rank_dropout (a down projection's output)


def valid(c: Combo) -> bool:
    """The constraints, over partial combinations (True while a rule's factors are unassigned)."""
    kind, conv = c.get("network.type"), c.get("network.conv_rank")
    if kind == "lora" and conv not in (None, 0) or kind == "locon" and conv == 0:
        return False  # lora has no convolution layers; locon is LoRA with them
    down_dropout = c.get("network.dropout", 0.0) > 0 or c.get("network.rank_dropout", 0.0) > 0
    if kind in NO_DROPOUT and down_dropout:
        return False
    lycoris_only = c.get("network.use_tucker") or c.get("network.decompose_both") or c.get("network.lokr_factor", -1) != -1
    if lycoris_only and down_dropout:
        return False  # these need loha or lokr, which have no dropout
    if c.get("network.use_tucker") and (kind not in (None, "loha", "lokr") or conv == 0):
        return False  # Tucker applies to LoHa's/LoKr's convolutions
    if kind not in (None, "lokr") and (c.get("network.lokr_factor", -1) != -1 or c.get("network.decompose_both")):
        return False
    if c.get("optimizer.loraplus_lr_ratio") is not None and (kind in ("loha", "lokr") or lycoris_only):
        return False  # LoRA+ speeds up a LoRA's up-projections; LoHa and LoKr have none
    # sd-scripts refuses a constant schedule with warmup steps (Lathe makes it a validation error).
    if c.get("scheduler.type") == "constant" and c.get("scheduler.warmup_steps", 0) > 0:
        return False
    # A flow option only where a family reads it (so a pair with it is a real test): set, it implies the
    # model, and that model's rules apply before the model factor is assigned.
    model = c.get("model")
    needs_flux = any(name in c and c[name] != off for name, off in FLUX_ONLY.items())
    needs_flow = needs_flux or any(name in c and c[name] != off for name, off in FLOW_ONLY.items())
    if needs_flux and model not in (None, "flux") or needs_flow and model not in (None, *FLOW_MODELS):
        return False
    if (model == "flux" or needs_flux) and (c.get("training.min_timestep") is not None
                                            or c.get("training.max_timestep") is not None):
        return False  # Flux.1 draws its noise levels without a timestep range (refused)
    if model in FLOW_MODELS or needs_flow:
        if any(name in c and c[name] != off for name, off in DDPM_ONLY.items()):
            return False
        schedule = c.get("training.huber_schedule")
        if schedule == "exponential" or schedule == "snr" and c.get("training.loss_type") in ("huber", "smooth_l1"):
            return False  # the snr and exponential Huber schedules read a DDPM schedule
    return _noise_and_loss_valid(c)


def _noise_and_loss_valid(c: Combo) -> bool:
    """adaptive_noise_scale needs a noise offset (sd-scripts refuses it without); a random strength, a
    Huber schedule other than the default only where they do something; the v-prediction scalings
    only for their prediction type."""
    if c.get("training.adaptive_noise_scale") is not None and c.get("training.noise_offset") == 0.0:
        return False
    if c.get("training.noise_offset_random_strength") and c.get("training.noise_offset") == 0.0:
        return False
    if c.get("training.ip_noise_gamma_random_strength") and "training.ip_noise_gamma" in c and c["training.ip_noise_gamma"] is None:
        return False
    if c.get("training.huber_schedule", "snr") != "snr" and c.get("training.loss_type") in ("l2", "l1"):
        return False
    scaling, model, setting = c.get("v_pred_loss"), c.get("model"), c.get("model.v_parameterization", "?")
    if scaling == "like_loss":  # v-prediction when the model's scheduler or the setting says so
        return model not in SCHEDULER_V_PREDICTION and setting is not True
    if scaling == "scale_like_noise":
        return not (model is not None and model not in SCHEDULER_V_PREDICTION and setting is None)
    return True


def combinations(n: int, seed: int = 0) -> list[tuple[str, Combo]]:
    """The first n of the seeded pairwise list, then random valid ones: (label, combo) pairs."""
    rows = pairwise.pairwise(SPACE, seed, valid)
    out = [(f"pairwise-{i:03d}", c) for i, c in enumerate(rows[:n])]
    extra = pairwise.random_valid(SPACE, seed, n - len(out), valid, exclude=rows) if n > len(out) else []
    return out + [(f"random-{i:03d}", c) for i, c in enumerate(extra)]


def baseline(**levels: Any) -> Combo:
    """The demo's own combination (every factor's first level) with `levels` changed; keys may use
    '__' for '.' (`baseline(network__dropout=0.1)`)."""
    c = {k: v[0] for k, v in SPACE.items()}
    for k, v in levels.items():
        name = k.replace("__", ".")
        if name not in SPACE or v not in SPACE[name]:
            raise KeyError(f"{name}={v!r} is not a level of the factor space")
        c[name] = v
    return c


def describe(c: Combo) -> str:
    """The factors that differ from the demo preset, as `name=level` words."""
    def short(name: str) -> str:
        sec, _, key = name.rpartition(".")
        return sec if key == "type" else key

    diff = [f"{short(k)}={v}" for k, v in c.items() if v != SPACE[k][0]]
    return " ".join(diff) or "demo preset"


# ----------------------------------------------------------------------------------------- config
def _sections(c: Combo, demo_dir: Path) -> dict[str, dict[str, Any]]:
    """The preset sections a combination changes (before the run length and saving are set)."""
    s: dict[str, dict[str, Any]] = {k: {} for k in ("model", "network", "dataset", "training", "scheduler", "launch")}
    for name, level in c.items():
        if name == "model":
            s["model"].update(pretrained_model=str(demo_dir / MODELS[level]), family="auto")
            if level in FLOW_MODELS:  # the demo captions are short; T5's own 256/512 tokens only cost time
                s["training"]["t5xxl_max_token_length"] = 32
        elif name == "captions":
            s["dataset"].update(CAPTIONS[level])
        elif name == "v_pred_loss":
            s["training"].update(V_PRED_LOSS[level])
        elif name == "optimizer.type":
            s["optimizer"] = {"type": level, **s.get("optimizer", {})}  # another type starts from its own defaults
        elif name in ("network.conv_rank", "network.dropout", "network.rank_dropout", "network.use_tucker",
                      "network.decompose_both", "network.lokr_factor") and level in (0, False, -1):
            continue  # the default, and not a field of every network type
        else:
            sec, key = name.split(".", 1)
            s.setdefault(sec, {})[key] = level
    s["launch"]["device"] = "cpu"
    s["sampling"] = {"prompts": []}
    s["logging"] = {"tensorboard": False}
    return s


def steps_per_epoch(cfg: TrainingConfig) -> int:
    """Optimizer steps per epoch, computed as the trainer does (build._schedule_length)."""
    from backend import dataset as D
    from backend.trainer.build import plan_settings

    ds = cfg.dataset
    data = D.load(ds, cfg.training.seed)
    item_buckets = D.bucket_of_items(data.items, D.buckets_for(ds))
    return D.steps_per_epoch(data.items, item_buckets, plan_settings(cfg, cfg.launch.num_processes, data.subsets))


def resume_step(spe: int) -> int:
    """The step save point to resume from: inside an epoch whenever an epoch has more than one step."""
    return next((k for k in RESUME_STEPS if k % spe), RESUME_STEPS[0])


def config_for(c: Combo, demo_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The demo preset changed as the combination says, with a short run: one step save point in
    the middle of an epoch (the resume point) and a few steps after it; no samples, no epoch saves."""
    data = demo_config(demo_dir, out_dir, **_sections(c, demo_dir))
    spe = steps_per_epoch(resolve(data))
    k = resume_step(spe)
    data["training"].update(max_train_steps=k + STEPS_AFTER_RESUME, max_train_epochs=None)
    data["saving"] = {"save_every_n_epochs": None, "save_last_n_epochs": None,
                      "save_every_n_steps": k, "save_last_n_steps": None}
    return data


# ----------------------------------------------------------------------------------------- result
@dataclass
class Result:
    """One combination's outcome. A check is True (passed), False (failed) or None (not checked:
    not applicable, or an earlier step failed)."""

    label: str
    combo: Combo
    checks: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(CHECKS))
    steps_per_epoch: int = 0
    resume_step: int = 0
    family: str | None = None
    v_prediction: bool | None = None
    first_diff_step: int | None = None
    first_diff_tensor: str | None = None
    rank_diffs: list[str] = field(default_factory=list)
    verify_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    dirs: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.checks.items() if v is False]

    @property
    def passed(self) -> bool:
        return not self.failed and self.checks["straight_finished"] is True

    def summary(self) -> str:
        """A few lines for a test failure or the campaign log."""
        head = f"{self.label}: {'PASS' if self.passed else 'FAIL ' + ','.join(self.failed)} ({describe(self.combo)})"
        facts = [f"  resume at step {self.resume_step} ({self.steps_per_epoch} steps/epoch), family {self.family}, "
                 f"v_prediction {self.v_prediction}, {self.seconds.get('total', 0):.0f} s"]
        if self.first_diff_step is not None:
            facts.append(f"  first differing loss at step {self.first_diff_step}")
        if self.first_diff_tensor:
            facts.append(f"  first differing export tensor: {self.first_diff_tensor}")
        if self.rank_diffs:
            facts.append(f"  {len(self.rank_diffs)} tensors differ between ranks, e.g. {self.rank_diffs[:3]}")
        facts += [f"  verify: {v}" for v in self.verify_failures[:4]]
        facts += [f"  error: {e}" for e in self.errors] + [f"  note: {n}" for n in self.notes]
        return "\n".join([head, *facts])

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failed": self.failed}


# ----------------------------------------------------------------------------------------- running
def launch_straight(cfg: TrainingConfig, timeout: float = RUN_TIMEOUT_S) -> tuple[Path, dict[str, Any]]:
    """The uninterrupted run through the real launcher, with the CLI's thread count, under
    tests/trainer_probe.py: the real trainer, and at the end each rank dumps every trainable tensor
    into <version>/probe/rank<N>.safetensors. (version_dir, final status)."""
    from tests.trainer_probe import PROBE_ENTRY

    v = runs.create_version_dir(cfg.output_dir, cfg.run_name)
    argv = launcher.build_argv(cfg, v, cpu_threads=launcher.default_cpu_threads(cfg), entry=PROBE_ENTRY)
    runs.write_run_files(v, cfg, launcher.command_argv(cfg, argv))
    runs.new_status(v)
    proc = launcher.start(v, argv, launcher.launch_env(cfg))
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.kill(v, reason=f"the combination campaign gave up after {timeout:.0f} s")
        proc.wait(timeout=60)
    return v, runs.finalize(v, proc.returncode)


def resume_cli(checkpoint: Path, timeout: float = RUN_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, Path | None]:
    """`python -m backend resume CHECKPOINT`; (process, the new version folder or None)."""
    run_dir = checkpoint.parents[2]
    before = set(runs.version_dirs(run_dir))
    try:
        proc = run_cli("resume", str(checkpoint), timeout=timeout)
    except subprocess.TimeoutExpired as e:  # the CLI is gone; the trainer lives in its own session
        for v in (p for p in runs.version_dirs(run_dir) if p not in before):
            launcher.kill(v, reason=f"the combination campaign gave up after {timeout:.0f} s")
        proc = subprocess.CompletedProcess(e.cmd, 124, str(e.stdout or ""), f"timed out after {timeout:.0f} s")
    new = [p for p in runs.version_dirs(run_dir) if p not in before]
    return proc, (new[-1] if new else None)


def run_combination(c: Combo, demo_dir: Path, work_dir: Path, label: str = "combo") -> Result:
    """Straight run, resume from its mid-epoch step checkpoint, then every check (see the module doc)."""
    t0 = time.monotonic()
    r = Result(label, dict(c))
    cfg = launcher.absolutize(resolve(config_for(c, demo_dir, work_dir / "runs")))
    r.steps_per_epoch, r.resume_step = steps_per_epoch(cfg), cfg.saving.save_every_n_steps or 0
    if r.resume_step % r.steps_per_epoch == 0:
        r.notes.append("every step ends an epoch: the resume point is at an epoch boundary")
    straight, status = launch_straight(cfg)
    r.seconds["straight"], r.dirs["straight"] = round(time.monotonic() - t0, 1), str(straight)
    r.checks["straight_finished"] = status.get("state") == "finished"
    if not r.checks["straight_finished"]:
        r.errors.append(f"straight run {status.get('state')}: {status.get('error')}")
        return _done(r, t0)
    _check_model(r, straight)
    ckpt = straight / "checkpoints" / f"step-{r.resume_step:08d}"
    t1 = time.monotonic()
    proc, resumed = resume_cli(ckpt)
    r.seconds["resume"] = round(time.monotonic() - t1, 1)
    r.checks["resume_finished"] = proc.returncode == 0 and resumed is not None
    if resumed is not None:
        r.dirs["resumed"] = str(resumed)
    if not r.checks["resume_finished"]:
        r.errors.append(f"resume exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    else:
        _check_losses(r, straight, resumed)
        _check_exports(r, straight, resumed)
    t2 = time.monotonic()
    _check_verify(r, [straight, *([resumed] if resumed else [])])
    r.seconds["verify"] = round(time.monotonic() - t2, 1)
    if cfg.launch.num_processes > 1:
        _check_ranks(r, straight)
    return _done(r, t0)


def _done(r: Result, t0: float) -> Result:
    r.seconds["total"] = round(time.monotonic() - t0, 1)
    return r


# ------------------------------------------------------------------------------------------ checks
def _same_float(a: float | None, b: float | None) -> bool:
    """Bit-identical as logged (JSON keeps a float's exact value); NaN equals NaN here."""
    return a is not None and b is not None and (a == b or (a != a and b != b))


def bit_equal(x: Any, y: Any) -> bool:
    """Two tensors with the same dtype, shape and bytes (so NaNs and -0.0 count too)."""
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.reshape(-1).contiguous().view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8))


def _export(version_dir: Path) -> Path:
    run_name = json.loads((version_dir / "config.json").read_text(encoding="utf-8"))["run_name"]
    return version_dir / "exports" / f"{run_name}.safetensors"


def _check_model(r: Result, straight: Path) -> None:
    """The detected family, and whether the run learned with v-prediction when it should."""
    started = (events(straight, "run_started") or [{}])[0]
    r.family = started.get("family")
    r.checks["family"] = r.family == FAMILY[r.combo["model"]]
    setting = r.combo["model.v_parameterization"]
    expected = setting if setting is not None else r.combo["model"] in SCHEDULER_V_PREDICTION
    seen = started.get("v_prediction")
    if seen is None and _export(straight).is_file():
        from safetensors import safe_open

        with safe_open(str(_export(straight)), framework="pt") as fh:
            meta = fh.metadata() or {}
        seen = {"True": True, "False": False}.get(meta.get("ss_v_parameterization", ""))
    r.v_prediction = seen
    if seen is None:
        r.notes.append("the trainer does not say whether it used v-prediction "
                       "(run_started.v_prediction or the export's ss_v_parameterization)")
    else:
        r.checks["v_prediction"] = seen == expected


def _check_losses(r: Result, straight: Path, resumed: Path) -> None:
    """The resumed run logs exactly the steps after the resume point, each loss bit-identical."""
    a, b = step_losses(straight), step_losses(resumed)
    want = list(range(r.resume_step + 1, max(a) + 1))
    if sorted(b) != want:
        r.notes.append(f"the resumed run logged steps {sorted(b)}, expected {want}")
    diff = [k for k in want if not _same_float(a.get(k), b.get(k))]
    r.first_diff_step = diff[0] if diff else None
    if diff:
        k = diff[0]
        r.notes.append(f"step {k}: straight loss {a.get(k)!r}, resumed {b.get(k)!r}")
    r.checks["losses_bit_exact"] = not diff and sorted(b) == want


def _check_exports(r: Result, straight: Path, resumed: Path) -> None:
    """The final exported LoRA files are identical tensor by tensor."""
    from safetensors.torch import load_file

    fa, fb = _export(straight), _export(resumed)
    if not (fa.is_file() and fb.is_file()):
        r.first_diff_tensor = f"missing export: {fa if not fa.is_file() else fb}"
        r.checks["exports_identical"] = False
        return
    ta, tb = load_file(str(fa)), load_file(str(fb))
    if ta.keys() != tb.keys():
        r.first_diff_tensor = f"different keys: {sorted(set(ta) ^ set(tb))[:3]}"
    else:
        r.first_diff_tensor = next((k for k in sorted(ta) if not bit_equal(ta[k], tb[k])), None)
    r.checks["exports_identical"] = r.first_diff_tensor is None


def _check_verify(r: Result, versions: list[Path]) -> None:
    """`python -m backend verify` passes every checkpoint folder of both runs (one process for all:
    it prints each folder's findings, then `VALID: folder` or `INVALID: folder`)."""
    folders = [p for v in versions if (v / "checkpoints").is_dir()
               for p in sorted((v / "checkpoints").iterdir()) if p.is_dir()]
    if not folders:
        r.verify_failures.append("no checkpoint folder to verify")
        r.checks["verify_all"] = False
        return
    proc = run_cli("verify", *map(str, folders))
    said: list[str] = []
    verdicts: dict[str, bool] = {}
    for line in proc.stdout.splitlines():
        head, _, folder = line.partition(": ")
        if head in ("VALID", "INVALID") and folder in map(str, folders):
            if head == "INVALID":
                finding = [ln for ln in said if ln.strip()] or ["?"]
                r.verify_failures.append(f"{Path(folder).parent.parent.name}/{Path(folder).name}: {finding[-1]}")
            verdicts[folder], said = head == "VALID", []
        else:
            said.append(line)
    unreported = [f for f in map(str, folders) if f not in verdicts]
    if unreported or (proc.returncode != 0) != (not all(verdicts.values())):
        last = (proc.stderr.strip().splitlines() or said or ["?"])[-1]
        r.verify_failures.append(f"verify exit {proc.returncode}, no verdict for {len(unreported)} folder(s): {last}")
    r.checks["verify_all"] = not r.verify_failures


def _check_ranks(r: Result, straight: Path) -> None:
    """Every dumped trainable tensor is bit-identical on rank 0 and rank 1."""
    from safetensors.torch import load_file

    files = [straight / "probe" / f"rank{i}.safetensors" for i in (0, 1)]
    if not all(f.is_file() for f in files):
        r.errors.append(f"the probe wrote no rank dumps in {straight / 'probe'}")
        r.checks["ranks_identical"] = False
        return
    t0, t1 = (load_file(str(f)) for f in files)
    only = [f"only on rank{0 if k in t0 else 1}: {k}" for k in sorted(set(t0) ^ set(t1))]
    r.rank_diffs = only + [k for k in sorted(set(t0) & set(t1)) if not bit_equal(t0[k], t1[k])]
    r.checks["ranks_identical"] = not r.rank_diffs and bool(t0)
