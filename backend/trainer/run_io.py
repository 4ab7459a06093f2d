"""What the trainer writes into its version folder besides checkpoints: events, status with a
heartbeat, TensorBoard scalars, and periodic `resources` events.

Rank 0 writes everything. A run across several machines gives every machine a version folder of its
own (each machine launches its own `python -m backend train`): there the machine's local main
process is a *worker* writer (status.json with its heartbeat and final state, and WORKER_EVENTS
only: no step events, no TensorBoard; checkpoints, exports and samples are rank 0's anyway).
`open_run_io` decides which, with one gather of every process's (machine, host, version folder), so
each worker's status names the main machine's host and version folder and the main's status lists
its workers. Every other process gets a silent stand-in.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from backend import resources, runs
from backend.events import EventWriter

HEARTBEAT_S = 2.0
RESOURCES_S = float(os.environ.get("LATHE_RESOURCES_INTERVAL_S", "10"))  # 0 turns resources events off
WARN_REPEAT_S = 600.0  # the same kind of warning at most this often
MB = 1024 * 1024
# What a worker machine's folder gets: the run's start and end, the warnings every rank raises
# (config, dataset) and its own machine's resources. Steps, epochs, saves and samples are rank 0's.
WORKER_EVENTS = frozenset({"run_started", "run_finished", "warning", "resources"})
IDENTITY_EVENTS = ("run_started", "run_finished")  # these carry `role` and `machine_rank`


class RunIO:
    """The trainer's writer. The loop adds to two counters that the resources events turn into the
    share of time spent waiting for data: `data_wait_s` (waiting for the next batch) and `busy_s`
    (inside training steps)."""

    def __init__(self, version_dir: Path, is_main: bool, tensorboard: bool, worker: bool = False,
                 identity: dict[str, Any] | None = None):
        """is_main: the global main process (writes everything). worker: the local main process of
        another machine (writes status and WORKER_EVENTS). identity: role fields for status.json
        (`role`, `machine_rank`, ...; empty for a run on one machine)."""
        self.dir = version_dir
        self.is_main = is_main
        self.is_worker = worker and not is_main
        self.identity = dict(identity or {})
        writes = is_main or self.is_worker
        self.step = 0
        self.total_steps: int | None = None
        self.data_wait_s = 0.0
        self.busy_s = 0.0
        self._window = (0.0, 0.0)  # the counters at the last resources event
        self._save_bytes: dict[int, int] = {}  # bytes written per save point (by step)
        self._warned_at: dict[str, float] = {}
        self._events = EventWriter(version_dir / "events.jsonl", background=True) if writes else None
        self._tb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(version_dir / "tensorboard"))
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ events
    def emit(self, event: str, **fields: Any) -> None:
        if self._events is None or (self.is_worker and event not in WORKER_EVENTS):
            return
        if event in IDENTITY_EVENTS and self.identity:
            keys = self.identity if event == "run_started" else ("role", "machine_rank")
            fields = {**{k: self.identity[k] for k in keys if k in self.identity}, **fields}
        self._events.emit(event, **fields)
        if event in ("checkpoint_saved", "export_saved") and isinstance(fields.get("bytes"), int):
            step = int(fields.get("step") or 0)
            self._save_bytes[step] = self._save_bytes.get(step, 0) + fields["bytes"]

    def warn(self, message: str) -> None:
        print(f"warning: {message}", flush=True)
        self.emit("warning", message=message)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

    # ------------------------------------------------------------------------------------ status
    @property
    def writes_status(self) -> bool:
        return self.is_main or self.is_worker

    def status(self, **fields: Any) -> None:
        if self.writes_status:
            runs.update_status(self.dir, heartbeat_at=time.time(), **fields)

    def start_heartbeat(self) -> None:
        """A thread refreshes status.json every few seconds, so a stale heartbeat means a dead or hung
        trainer, and emits a `resources` event every RESOURCES_S."""
        if not self.writes_status or self._beat is not None:
            return

        def beat() -> None:
            interval = min(HEARTBEAT_S, RESOURCES_S) if RESOURCES_S > 0 else HEARTBEAT_S
            next_report = time.monotonic() + RESOURCES_S
            last_step, step_at = self.step, time.time()
            while not self._stop_beat.wait(interval):
                # step_at: when the step counter last moved. A trainer whose main thread is stuck
                # (in a collective, say) keeps beating from this thread; it shows here.
                if self.step != last_step:
                    last_step, step_at = self.step, time.time()
                # A full disk must not kill the trainer from this thread.
                with contextlib.suppress(OSError):
                    runs.update_status(self.dir, heartbeat_at=time.time(), step=self.step, step_at=step_at)
                if RESOURCES_S > 0 and time.monotonic() >= next_report:
                    next_report = time.monotonic() + RESOURCES_S
                    try:
                        self.report_resources()
                    except Exception as exc:  # noqa: BLE001 - monitoring never stops training
                        print(f"resources report failed: {exc}", file=sys.stderr, flush=True)

        self._beat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beat.start()

    # ------------------------------------------------------------------------------ resources
    def next_save_bytes(self) -> int | None:
        """The size of the latest save point (export + state): what the next one will need."""
        return self._save_bytes[max(self._save_bytes)] if self._save_bytes else None

    def report_resources(self) -> dict[str, Any]:
        """Emit one `resources` event (and warnings it calls for); return the event's fields."""
        wait, busy = self.data_wait_s, self.busy_s
        d_wait, d_busy = wait - self._window[0], busy - self._window[1]
        share = resources.data_wait_share(d_wait, d_busy)
        if share is not None or d_wait + d_busy <= 0:
            self._window = (wait, busy)  # else keep widening the window until it is long enough
        snap = resources.sample(self.dir)
        fields = {**snap, "step": self.step, "data_wait_share": share, "data_wait_s": round(d_wait, 3),
                  "busy_s": round(d_busy, 3), "process": _process_memory()}
        self.emit("resources", **fields)
        now = time.monotonic()
        for message in resources.warnings_for(snap, share, self.next_save_bytes()):
            kind = message.split(":", 1)[0]
            if now - self._warned_at.get(kind, -WARN_REPEAT_S) >= WARN_REPEAT_S:
                self._warned_at[kind] = now
                self.warn(message)
        return fields

    def close(self) -> None:
        self._stop_beat.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._events is not None:
            self._events.close()


# ------------------------------------------------------------------------------- several machines
def machine_layout(cfg: Any) -> tuple[int, int]:
    """(machines, this machine's rank). torch's elastic agent (under `accelerate launch`) says it in
    GROUP_WORLD_SIZE / GROUP_RANK, also when an accelerate config file set them; else the config."""
    count = int(os.environ.get("GROUP_WORLD_SIZE") or cfg.launch.num_machines)
    rank = int(os.environ.get("GROUP_RANK") or cfg.launch.machine_rank)
    return count, rank


def open_run_io(acc: Any, version_dir: Path, cfg: Any) -> RunIO:
    """The writer for this process. One machine: rank 0 writes, the others are silent (no
    collective). Several: one gather_object of every process's (machine, host, version folder),
    called by every rank at the same point, then rank 0 is the main writer, the local main process
    of each other machine a worker writer, and the status of each says which it is."""
    machines, machine_rank = machine_layout(cfg)
    if machines <= 1 or acc.num_processes <= 1:
        return RunIO(version_dir, acc.is_main_process, cfg.logging.tensorboard)
    from accelerate.utils import gather_object

    me = {"process": acc.process_index, "machine_rank": machine_rank, "host": socket.gethostname(),
          "version_dir": str(version_dir), "local_main": bool(acc.is_local_main_process)}
    everyone = gather_object([me])
    main = next(p for p in everyone if p["process"] == 0)
    base = {"machine_rank": machine_rank, "num_machines": machines, "host": me["host"]}
    if acc.is_main_process:
        workers = sorted(({"machine_rank": p["machine_rank"], "host": p["host"], "version_dir": p["version_dir"]}
                          for p in everyone if p["local_main"] and p["process"] != 0), key=lambda w: w["machine_rank"])
        identity = {"role": "main", **base, "workers": workers}
    else:
        identity = {"role": "worker", **base, "main_host": main["host"], "main_version_dir": main["version_dir"]}
    return RunIO(version_dir, acc.is_main_process, cfg.logging.tensorboard,
                 worker=bool(acc.is_local_main_process), identity=identity)


def _process_memory() -> dict[str, Any]:
    """This process: resident memory and, when CUDA is in use, what torch holds on its device."""
    out: dict[str, Any] = {"rss_mb": round(psutil.Process().memory_info().rss / MB, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / MB, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / MB, 1)
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
    return out
