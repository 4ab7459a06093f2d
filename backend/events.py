"""events.jsonl: the append-only event stream a run writes and the GUI/CLI follow.

Each line is one JSON object with at least "event" and "time" (unix seconds). Readers follow the file
from a byte offset, so a restarted GUI picks up where it left off and never re-reads what it has.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

EVENT_NAMES = (
    "run_started",
    "cache_filled",
    "step",
    "epoch_end",
    "validation",
    "checkpoint_saved",
    "checkpoint_removed",
    "export_saved",
    "export_removed",
    "sample_saved",
    "warning",
    "resources",
    "run_finished",
)


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


class EventWriter:
    """Appends events to events.jsonl, one flushed line each (thread-safe).

    With background=True (the trainer), lines go through a queue to a writer thread, so a slow
    disk never holds up a training step; order is kept, and close() drains the queue and fsyncs.
    """

    def __init__(self, path: str | Path, background: bool = False):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if _ends_mid_line(self.path):
            self._fh.write("\n")  # a line cut short by a killed writer: end it, so ours stays whole
        self.write_error: OSError | None = None
        self._queue: queue.SimpleQueue[str | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, name="events", daemon=True)
            self._thread.start()

    def emit(self, event: str, when: float | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event; `when` (unix seconds) dates it when it is written later than it happened."""
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r}")
        record = {"event": event, "time": round(time.time() if when is None else when, 3), **_clean(fields)}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        if self._queue is not None:
            self._queue.put(line)
        else:
            self._write(line)
        return record

    def _write(self, line: str) -> None:
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def _drain(self) -> None:
        while (line := self._queue.get()) is not None:
            try:
                self._write(line)
            except OSError as e:  # a full disk: keep training; the save that fails will say so
                self.write_error = e

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        with self._lock:
            if not self._fh.closed:
                with contextlib.suppress(OSError):
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                self._fh.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete event lines from `offset`; return them and the offset after the last whole line.

    A line still being written (no trailing newline yet) is left for the next call. A line that is
    not valid JSON (e.g. cut short by a crash) is skipped.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and "event" in obj:
            events.append(obj)
    return events, offset + end + 1


def last_step(path: str | Path, window: int = 1 << 16) -> int | None:
    """The step of the last `step` event in the final `window` bytes of events.jsonl (None if none
    is there): what a dead trainer last reported, newer than its last heartbeat in status.json."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            fh.seek(max(0, p.stat().st_size - window))
            data = fh.read()
    except OSError:
        return None
    for raw in reversed(data.splitlines()):
        if b'"step"' not in raw:
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the first line of the window may be cut, the last one half written
        if isinstance(obj, dict) and obj.get("event") == "step" and isinstance(obj.get("step"), int):
            return obj["step"]
    return None


def read_text_from(path: str | Path, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[str, int]:
    """Read new text (e.g. of train.log) from `offset`, at most max_bytes; returns (text, new_offset)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(max_bytes)
    except FileNotFoundError:
        return "", offset
    return data.decode("utf-8", errors="replace"), offset + len(data)
