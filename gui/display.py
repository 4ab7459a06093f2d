"""Text and HTML for the Run tab (pure): the state banner, the progress bar, the resource monitor."""

from __future__ import annotations

import html
from typing import Any

from gui.live import RunView

STATE_WORDS = {
    "starting": "Starting", "running": "Running", "stopping": "Stopping (saving a stop checkpoint)",
    "finished": "Finished", "stopped": "Stopped", "failed": "Failed", "unknown": "Unknown",
}
GB = 1024.0


def duration(seconds: float | None) -> str:
    """'1:02:03' or '2:03'."""
    if seconds is None or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_name_of(view: RunView) -> str:
    v = view.version_dir
    return f"{v.parent.name} / {v.name}"


def reason_of(view: RunView) -> str:
    st = view.status
    state = st.get("state") or "unknown"
    reason = st.get("error") or view.finished.get("error")
    if reason:
        return str(reason)
    if state == "finished":
        took = (st.get("finished_at") or 0) - (st.get("started_at") or 0)
        return f"all {st.get('step', 0)} steps done in {duration(took)}" if took > 0 else f"finished at step {st.get('step', 0)}"
    if state in ("starting", "running"):
        return "waiting for the trainer to load the model" if not view.started else "training"
    return ""


def role_note(status: dict[str, Any]) -> str:
    """For a worker machine's version of a run across several machines: whose worker it is."""
    if status.get("role") != "worker":
        return ""
    return (f"Machine {status.get('machine_rank')}: a worker of {status.get('main_host')}:"
            f"{status.get('main_version_dir')} (steps, checkpoints, exports and samples are there)")


def state_banner(view: RunView | None) -> str:
    """A prominent line: the run, its state, and the one-line reason."""
    if view is None:
        return ('<div class="lathe-banner lathe-state-none"><b>No run yet.</b> '
                "Press Start to train with the settings from the Setup tab.</div>")
    state = view.status.get("state") or "unknown"
    reason = reason_of(view)
    note = role_note(view.status)
    return (f'<div class="lathe-banner lathe-state-{html.escape(state)}" data-state="{html.escape(state)}">'
            f'<span class="lathe-run">{html.escape(run_name_of(view))}</span> '
            f'<span class="lathe-state">{html.escape(STATE_WORDS.get(state, state))}</span>'
            + (f'<div class="lathe-reason">{html.escape(reason)}</div>' if reason else "")
            + (f'<div class="lathe-role">{html.escape(note)}</div>' if note else "") + "</div>")


def progress_numbers(view: RunView) -> dict[str, Any]:
    step = int(view.last_step.get("step") or view.status.get("step") or 0)
    total = view.started.get("total_steps") or view.status.get("total_steps")
    return {
        "step": step,
        "total": int(total) if total else None,
        "epoch": view.last_step.get("epoch"),
        "epochs": view.started.get("total_epochs"),
        "rate": view.steps_per_s(),
        "eta": view.last_step.get("eta_s") if view.status.get("state") in ("running", "stopping") else None,
    }


def progress_text(view: RunView) -> str:
    n = progress_numbers(view)
    parts = [f"step {n['step']}/{n['total'] or '?'}"]
    if n["epoch"] is not None:
        parts.append(f"epoch {n['epoch']}/{n['epochs'] or '?'}")
    loss = view.last_step.get("loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
    if n["rate"]:
        rate = n["rate"]
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
    if n["eta"] is not None:
        parts.append(f"ETA {duration(n['eta'])}")
    return " · ".join(parts)


def progress_html(view: RunView | None) -> str:
    if view is None:
        return '<div class="lathe-progress" data-step="0" data-total="0"></div>'
    n = progress_numbers(view)
    pct = 100.0 * n["step"] / n["total"] if n["total"] else 0.0
    state = html.escape(view.status.get("state") or "unknown")
    version = html.escape(str(view.version_dir), quote=True)  # the page's live channel follows this version
    return (f'<div class="lathe-progress" data-step="{n["step"]}" data-total="{n["total"] or 0}" data-state="{state}" '
            f'data-version="{version}">'
            f'<div class="lathe-bar"><div class="lathe-fill lathe-fill-{state}" style="width:{min(pct, 100):.1f}%"></div></div>'
            f'<div class="lathe-progress-text">{html.escape(progress_text(view))}</div></div>')


def _gb(mb: float | None) -> str:
    return "?" if mb is None else f"{mb / GB:.1f}"


def resources_markdown(snapshot: dict[str, Any], data_wait_share: float | None = None,
                       warnings: list[str] | None = None) -> str:
    """GPU utilisation and memory, RAM, free disk, and the data-loading verdict, one line each."""
    lines = []
    gpus = snapshot.get("gpus") or []
    for g in gpus:
        lines.append(f"**GPU {g.get('index')}** {g.get('name', '')}: {g.get('util_pct', 0):.0f}% busy, "
                     f"{_gb(g.get('mem_used_mb'))} / {_gb(g.get('mem_total_mb'))} GB")
    if not gpus:
        lines.append("**GPU**: none visible (training runs on the CPU)")
    ram = snapshot.get("ram") or {}
    if ram:
        lines.append(f"**RAM**: {_gb(ram.get('used_mb'))} / {_gb(ram.get('total_mb'))} GB")
    if snapshot.get("cpu_pct") is not None:
        lines.append(f"**CPU**: {snapshot['cpu_pct']:.0f}%")
    disk = snapshot.get("disk") or {}
    if disk:
        lines.append(f"**Disk free**: {_gb(disk.get('free_mb'))} GB of {_gb(disk.get('total_mb'))} GB ({disk.get('path')})")
    if data_wait_share is not None:
        verdict = "the bottleneck" if data_wait_share > 0.3 else "fine"
        lines.append(f"**Data loading**: waited {data_wait_share:.0%} of the time ({verdict})")
    lines += [f"⚠ {w}" for w in (warnings or [])[-3:]]
    return "  \n".join(lines)
