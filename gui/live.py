"""What the Run tab shows about one version, folded from its run folder (no Gradio here).

A RunView follows status.json, events.jsonl and train.log from byte offsets (backend.follow), so
each poll reads only what is new and a view can be rebuilt from the folder alone after a restart.
Every part the page draws has a revision number; the page redraws a part only when it changed.
A view starts reading train.log near its end (LOG_START_BYTES before it), not at its first byte:
the page shows the log's tail, and a long log (100k lines) is never read whole.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.follow import Follower

LOG_LINES = 400
LOG_START_BYTES = 256 * 1024  # enough for LOG_LINES lines of up to 650 bytes
MAX_POINTS = 600  # a curve never sends more points than this: about one per pixel of a plot's width
MIN_POLL_S = 0.05  # the view reads the folder at most this often, however many pages look


@dataclass
class RunView:
    version_dir: Path
    follower: Follower
    status: dict[str, Any] = field(default_factory=dict)
    started: dict[str, Any] = field(default_factory=dict)  # the run_started event
    last_step: dict[str, Any] = field(default_factory=dict)
    finished: dict[str, Any] = field(default_factory=dict)  # the run_finished event
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # series -> [(step, value)]
    activity: list[str] = field(default_factory=list)  # checkpoint saved / removed, warnings
    samples: list[dict[str, Any]] = field(default_factory=list)  # sample_saved events
    resources: dict[str, Any] = field(default_factory=dict)  # the latest resources event
    warnings: list[str] = field(default_factory=list)
    step_times: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20))  # (time, step)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    partial: str = ""  # the log's last line while it is still being written
    log_cut: bool = False  # reading began mid-file: the text up to the first newline is a fragment
    revs: dict[str, int] = field(default_factory=lambda: {"status": 0, "curves": 0, "samples": 0, "activity": 0,
                                                          "log": 0, "checkpoints": 0, "resources": 0})
    done: bool = False
    polled_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    guard: Any = field(default_factory=threading.RLock)  # shared with the kill (see Runner.ending)

    # ---------------------------------------------------------------------------------------- poll
    def poll(self, proc: Any = None, force: bool = False) -> None:
        """Read what is new (at most every MIN_POLL_S, whoever asks)."""
        with self.guard, self.lock:
            now = time.monotonic()
            if self.done or (not force and now - self.polled_at < MIN_POLL_S):
                return
            self.polled_at = now
            if proc is not None and self.follower.proc is None:
                self.follower.proc = proc
            u = self.follower.poll()
            if u.status != self.status:
                self.status = u.status
                self._bump("status")
            for ev in u.events:
                self._event(ev)
            if u.log:
                self._log(u.log)
            self.done = u.done

    def _bump(self, part: str) -> None:
        self.revs[part] += 1

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(ev)

    def _point(self, series: str, x: Any, y: Any) -> None:
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            self.curves.setdefault(series, []).append((float(x), float(y)))

    def _on_run_started(self, ev: dict[str, Any]) -> None:
        self.started = ev
        self._bump("status")

    def _on_step(self, ev: dict[str, Any]) -> None:
        self.last_step = ev
        step = ev.get("step")
        if isinstance(step, int) and isinstance(ev.get("time"), (int, float)):
            self.step_times.append((float(ev["time"]), step))
        self._point("loss", step, ev.get("loss"))
        self._point("learning rate", step, ev.get("lr"))
        self._point("Prodigy d", step, ev.get("d"))
        self._bump("curves")
        self._bump("status")

    def _on_epoch_end(self, ev: dict[str, Any]) -> None:
        self._point("epoch mean loss", ev.get("step"), ev.get("mean_loss"))
        self._bump("curves")

    def _on_validation(self, ev: dict[str, Any]) -> None:
        self._point("validation loss", ev.get("step"), ev.get("val_loss"))
        self._bump("curves")

    def _note(self, ev: dict[str, Any], text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(float(ev.get("time") or time.time())))
        self.activity.append(f"{stamp}  {text}")
        self._bump("activity")

    def _on_checkpoint_saved(self, ev: dict[str, Any]) -> None:
        size = (ev.get("bytes") or 0) / 1e6
        self._note(ev, f"saved checkpoint {ev.get('name')} (step {ev.get('step')}, {size:.1f} MB, "
                       f"{ev.get('seconds', 0):.1f} s)")
        self._bump("checkpoints")

    def _on_checkpoint_removed(self, ev: dict[str, Any]) -> None:
        self._note(ev, f"removed checkpoint {ev.get('name')}: {ev.get('reason')}")
        self._bump("checkpoints")

    def _on_export_saved(self, ev: dict[str, Any]) -> None:
        self._note(ev, f"wrote LoRA {Path(str(ev.get('path'))).name}")

    def _on_export_removed(self, ev: dict[str, Any]) -> None:
        self._note(ev, f"removed LoRA {Path(str(ev.get('path'))).name}")

    def _on_sample_saved(self, ev: dict[str, Any]) -> None:
        self.samples.append(ev)
        self._bump("samples")

    def _on_warning(self, ev: dict[str, Any]) -> None:
        self.warnings.append(str(ev.get("message")))
        self._note(ev, f"warning: {ev.get('message')}")

    def _on_resources(self, ev: dict[str, Any]) -> None:
        self.resources = ev
        self._bump("resources")

    def _on_run_finished(self, ev: dict[str, Any]) -> None:
        self.finished = ev
        self._bump("status")
        self._bump("checkpoints")

    def _log(self, text: str) -> None:
        if self.log_cut:
            cut = text.find("\n")
            if cut < 0:
                return
            text, self.log_cut = text[cut + 1:], False
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            shown = line.split("\r")[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            self.log.append(shown)
        self._bump("log")

    # ---------------------------------------------------------------------------------------- views
    def log_text(self) -> str:
        tail = self.partial.split("\r")[-1]
        return "\n".join([*self.log, tail] if tail else self.log)

    def curve_rows(self, series: tuple[str, ...]) -> list[tuple[float, float, str]]:
        """(step, value, series) rows of the named curves, thinned to MAX_POINTS per curve."""
        rows: list[tuple[float, float, str]] = []
        for name in series:
            pts = self.curves.get(name, [])
            thinned = pts[:: -(-len(pts) // MAX_POINTS) or 1]
            if pts and thinned[-1] != pts[-1]:
                thinned.append(pts[-1])
            rows += [(x, y, name) for x, y in thinned]
        return rows

    def steps_per_s(self) -> float | None:
        """Optimizer steps per second over the last few step events."""
        if len(self.step_times) < 2:
            return None
        (t0, s0), (t1, s1) = self.step_times[0], self.step_times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def latest_samples(self) -> list[dict[str, Any]]:
        """The sample images of the newest save point that has any."""
        if not self.samples:
            return []
        folder = Path(str(self.samples[-1].get("path"))).parent
        return [s for s in self.samples if Path(str(s.get("path"))).parent == folder]


class Views:
    """One RunView per version folder, shared by every browser session of this GUI process."""

    def __init__(self, guard: Any = None) -> None:
        self._views: dict[str, RunView] = {}
        self._lock = threading.Lock()
        self._guard = guard if guard is not None else threading.RLock()

    def get(self, version_dir: str | Path) -> RunView:
        key = str(version_dir)
        with self._lock:
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = new_view(Path(key), self._guard)
            return view


def new_view(version_dir: Path, guard: Any) -> RunView:
    """A view of `version_dir` whose log reading starts LOG_START_BYTES before the log's end."""
    try:
        start = max(0, (version_dir / "train.log").stat().st_size - LOG_START_BYTES)
    except OSError:
        start = 0
    return RunView(version_dir, Follower(version_dir, log_offset=start), log_cut=start > 0, guard=guard)
