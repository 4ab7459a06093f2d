"""What the trainer writes into its version folder besides checkpoints: events, status with a
heartbeat, TensorBoard scalars. Only rank 0 writes; other ranks get a silent stand-in."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from backend import runs
from backend.events import EventWriter

HEARTBEAT_S = 2.0


class RunIO:
    def __init__(self, version_dir: Path, is_main: bool, tensorboard: bool):
        self.dir = version_dir
        self.is_main = is_main
        self.step = 0
        self.total_steps: int | None = None
        self.data_wait_s = 0.0  # seconds the loop waited for its next batch (maintained by the loop)
        self.busy_s = 0.0  # seconds spent in training steps (maintained by the loop)
        self._events = EventWriter(version_dir / "events.jsonl") if is_main else None
        self._tb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(version_dir / "tensorboard"))
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ events
    def emit(self, event: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.emit(event, **fields)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", flush=True)
        self.emit("warning", message=message)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

    # ------------------------------------------------------------------------------------ status
    def status(self, **fields: Any) -> None:
        if self.is_main:
            runs.update_status(self.dir, heartbeat_at=time.time(), **fields)

    def start_heartbeat(self) -> None:
        """A thread refreshes status.json every few seconds, so a stale heartbeat means a dead trainer."""
        if not self.is_main or self._beat is not None:
            return

        def beat() -> None:
            while not self._stop_beat.wait(HEARTBEAT_S):
                # A full disk must not kill the trainer from this thread.
                with contextlib.suppress(OSError):
                    runs.update_status(self.dir, heartbeat_at=time.time(), step=self.step)

        self._beat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._stop_beat.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._events is not None:
            self._events.close()
