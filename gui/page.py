"""What the tabs share: the output folder, the runner, the live views, the Setup form, and the few
components that more than one tab updates (the tab bar, the followed run, the Setup messages)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from backend import runs
from backend.config import ConfigError, TrainingConfig
from backend.presets import load_preset, user_presets_dir
from gui.fields import Form
from gui.form import Form as FormValues
from gui.form import config_to_form
from gui.live import Views
from gui.runner import Runner
from gui.security import inside

RUNS_CACHE_S = 2.0
FIRST_PRESET = "demo"


@dataclass
class Page:
    output_dir: Path
    runner: Runner
    views: Views
    form: Form = field(default_factory=Form)
    shared: dict[str, Any] = field(default_factory=dict)  # name -> component shared across tabs
    tabs: dict[str, Any] = field(default_factory=dict)  # name -> the object holding a tab's handlers
    tab_items: dict[str, Any] = field(default_factory=dict)  # tab id -> its gr.Tab
    queue_worker: Any = None  # gui.queue_worker.QueueWorker, started by app.py (not by tests that build the UI)
    _runs: tuple[float, list[runs.RunInfo]] = (0.0, [])
    _runs_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, output_dir: str | Path) -> Page:
        out = Path(output_dir).expanduser().resolve()
        runner = Runner(out)
        return cls(out, runner, Views(runner.ending))

    @property
    def presets_dir(self) -> Path:
        return user_presets_dir(self.output_dir)

    def inside(self, path: Any) -> str | None:
        """A path a browser sent (a dropdown value, a table row), only when it lies in the output folder:
        the handlers never act on a folder elsewhere, whatever a client posts."""
        ok = inside(path, self.output_dir)
        return str(ok) if ok is not None else None

    def component(self, name: str) -> Any:
        return self.shared[name]

    def share(self, name: str, component: Any) -> Any:
        self.shared[name] = component
        return component

    def form_values_for(self, cfg: TrainingConfig) -> FormValues:
        """The form for `cfg`, writing into this GUI's output folder (the one it watches and serves)."""
        values = config_to_form(cfg)
        values["output_dir"] = str(self.output_dir)
        return values

    def first_form(self) -> tuple[FormValues, str]:
        """The form shown on first open: the demo preset, so Start works out of the box."""
        try:
            preset = load_preset(FIRST_PRESET, self.presets_dir)
            return self.form_values_for(preset.config), f"Loaded the **{FIRST_PRESET}** preset."
        except ConfigError as e:
            return self.form_values_for(TrainingConfig()), f"The {FIRST_PRESET} preset did not load ({'; '.join(e.lines)}): showing the defaults."

    def list_runs(self, fresh: bool = False) -> list[runs.RunInfo]:
        """Every version in the output folder (reconciled), cached for a moment: every open page polls."""
        with self._runs_lock:
            at, infos = self._runs
            if fresh or time.monotonic() - at > RUNS_CACHE_S:
                infos = self.runner.list_runs()
                self._runs = (time.monotonic(), infos)
            return infos


def version_choices(infos: list[runs.RunInfo]) -> list[tuple[str, str]]:
    """(label, version folder) pairs, newest first."""
    ordered = sorted(infos, key=lambda i: i.started_at or 0.0, reverse=True)
    return [(f"{i.run_name} / version_{i.version} · {i.state}" + (f" · worker (machine {i.machine_rank})"
             if i.role == "worker" else ""), i.path) for i in ordered]


def dropdown_update(choices: list[tuple[str, str]], value: str | None) -> Any:
    known = {v for _, v in choices}
    return gr.update(choices=choices, value=value if value in known else (choices[0][1] if choices else None))
