"""The app's queue worker (no Gradio here): a daemon thread that works the output folder's run queue
(backend.run_queue.tick) every second while app.py runs, so queued runs start one after another
with nobody at the page. The queue's state is only in queue.json and the run folders: a restarted
app.py picks up where the last one stopped, and `python -m backend queue run` can work it instead."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

from backend import run_queue

TICK_S = 1.0
KEEP_EVENTS = 50


class QueueWorker:
    def __init__(self, output_dir: Path, tick_s: float = TICK_S):
        self.output_dir, self.tick_s = Path(output_dir), tick_s
        self.events: collections.deque[str] = collections.deque(maxlen=KEEP_EVENTS)
        self.last: run_queue.Tick | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> QueueWorker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lathe-queue", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.once()
            self._stop.wait(self.tick_s)

    def once(self) -> run_queue.Tick | None:
        """One tick; a failure (an unreadable queue file, a full disk) is kept as `error`, never raised."""
        try:
            t = run_queue.tick(self.output_dir)
        except Exception as e:  # noqa: BLE001 - the thread must live on; the page shows the error
            self.error = f"{type(e).__name__}: {e}"
            return None
        self.error, self.last = None, t
        stamp = time.strftime("%H:%M:%S")
        self.events.extend(f"{stamp} {ev.line()}" for ev in t.events)
        return t
