"""Plain-language previews (pure): which checkpoints a config keeps, the CLI command that reproduces
a run, and what a resume would change."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from backend import checkpoints as C
from backend import launcher
from backend.config import TrainingConfig
from backend.config_keys import sparse_overrides
from backend.resume import FROZEN, ResumePlan

MAX_LISTED = 6


# ------------------------------------------------------------------------------------------ saving
def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def numbers_in_words(noun: str, numbers: list[int]) -> str:
    """'epoch 4', 'epochs 3 and 4', 'epochs 1, 2, 3, … 20 (20 saves)'."""
    if len(numbers) == 1:
        return f"{noun} {numbers[0]}"
    if len(numbers) <= MAX_LISTED:
        return f"{noun}s {join_words([str(n) for n in numbers])}"
    return f"{noun}s {', '.join(str(n) for n in numbers[:3])}, … {numbers[-1]} ({len(numbers)} saves)"


def kept_saves(total: int, every: int, keep: int | None) -> list[int]:
    """The save numbers that survive rotation: every `every` up to `total`, the newest `keep` of them."""
    saves = list(range(every, total + 1, every))
    return saves[-keep:] if keep is not None else saves


def _kind_words(noun: str, total: int | None, every: int | None, keep: int | None) -> str | None:
    """What survives of one kind of save (epoch or step), in words; None when there are none."""
    if every is None:
        return None
    if total is not None:
        kept = kept_saves(total, every, keep)
        return numbers_in_words(noun, kept) if kept else None
    if keep is None:
        return f"every {noun} save (one every {every} {noun}s, none deleted)"
    newest = f"the newest {noun} save" if keep == 1 else f"the newest {keep} {noun} saves"
    return f"{newest} (one every {every} {noun}s)"


def saving_preview(cfg: TrainingConfig) -> str:
    """Which checkpoints survive the run, in words: 'Kept at the end: epochs 9 and 10, plus final.'"""
    s, t = cfg.saving, cfg.training
    parts = [w for w in (
        _kind_words("epoch", t.max_train_epochs, s.save_every_n_epochs, s.save_last_n_epochs),
        _kind_words("step", t.max_train_steps, s.save_every_n_steps, s.save_last_n_steps),
    ) if w]
    extras = ["final"]
    if cfg.dataset.validation_split > 0 or cfg.dataset.validation_data_dir:
        extras.append("best (lowest validation loss)")
    if parts:
        lines = [f"Kept at the end: {join_words(parts)}, plus {join_words(extras)}."]
    else:
        lines = [f"Kept at the end: only {join_words(extras)}. Nothing is saved during training, so an "
                 "interruption loses everything since the start."]
    if s.save_state:
        lines.append("Each save point is a resumable state checkpoint plus a LoRA file.")
    else:
        lines.append("Only LoRA files are written (save_state is off): none of them can be resumed.")
    lines.append("Stop saves a resumable stop checkpoint first; stop checkpoints are never rotated away."
                 if s.save_on_stop and s.save_state else "Stop saves nothing (save_on_stop is off).")
    return " ".join(lines)


# ------------------------------------------------------------------------------------------ commands
def config_file_name(cfg: TrainingConfig) -> str:
    return f"{cfg.run_name}.json"


def train_command(cfg: TrainingConfig) -> str:
    """A shell snippet that reproduces a fresh run of `cfg` with the CLI: the settings as a sparse
    preset file (only what differs from the defaults), then `python -m backend train FILE`."""
    name = config_file_name(cfg)
    body = json.dumps(sparse_overrides(cfg), indent=1, ensure_ascii=False)
    return f"cat > {shlex.quote(name)} <<'JSON'\n{body}\nJSON\npython -m backend train {shlex.quote(name)}"


def worker_commands_text(cfg: TrainingConfig) -> str:
    """For a run across several machines: the command for each other machine, as shell comments
    and lines; '' for a run on one machine."""
    lc = cfg.launch
    name = config_file_name(cfg)
    commands = launcher.worker_commands(cfg, name)
    if not commands:
        return ""
    port = lc.main_process_port or 29500  # accelerate's default
    head = [f"# Several machines ({lc.num_machines}); this is machine {lc.machine_rank}.",
            f"# On each other machine, from its Lathe folder: write the same {name} (the `cat` above)",
            "# and run that machine's command. Every machine needs the model and the dataset at the same",
            f"# paths and must reach {lc.main_process_ip}:{port} on machine 0 (open that TCP port there).",
            "# Checkpoints, exports and samples are written on machine 0 only; each other machine keeps",
            "# a worker version folder (status, events, log) in its own output folder."]
    body = [f"# machine {r}:\n{c}" for r, c in zip(launcher.other_machine_ranks(cfg), commands, strict=True)]
    return "\n".join(head + body)


def set_items(changes: list[tuple[str, Any, Any]]) -> list[str]:
    """`--set PATH=VALUE` arguments (VALUE as JSON) for the (path, old, new) changes of a resume plan."""
    return [f"{path}={json.dumps(new, ensure_ascii=False)}" for path, _, new in changes]


def resume_command(checkpoint: str | Path, changes: list[tuple[str, Any, Any]]) -> str:
    argv = ["python", "-m", "backend", "resume", str(checkpoint)]
    for item in set_items(changes):
        argv += ["--set", item]
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------ resume
def _value(v: Any) -> str:
    return "(empty)" if v is None else json.dumps(v, ensure_ascii=False)


def frozen_summary() -> str:
    """The settings that may never change on resume, grouped by reason."""
    groups: dict[str, list[str]] = {}
    for path, reason in FROZEN.items():
        groups.setdefault(reason, []).append(path)
    return "; ".join(f"{', '.join(paths)} ({reason})" for reason, paths in groups.items())


def resume_preview(plan: ResumePlan) -> str:
    """Markdown: where the resume starts, what differs from the checkpoint, or why it is refused."""
    m = plan.manifest
    where = f"step {m.get('step', '?')}, epoch {C.epoch_label(m) or '?'}"
    ck = plan.checkpoint
    name = "/".join(p.name for p in (ck.parent.parent.parent, ck.parent.parent, ck) if p.name)
    blocks = [f"**Resume from `{name}`** ({where})."]
    if plan.refused:
        blocks.append("**Cannot resume:**\n" + "\n".join(f"- {r}" for r in plan.refused))
    if plan.changed:
        blocks.append("Settings that differ from the checkpoint (allowed to change):\n"
                      + "\n".join(f"- `{p}`: {_value(a)} → {_value(b)}" for p, a, b in plan.changed))
    elif not plan.refused:
        blocks.append("No setting differs from the checkpoint: training continues exactly where it stopped.")
    if plan.ok:
        blocks.append("The resume starts a new version folder; the checkpoint itself is never modified or rotated.")
    return "\n\n".join(blocks)
