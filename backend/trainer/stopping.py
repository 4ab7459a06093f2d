"""Graceful stop: the STOP file in the version folder, or SIGINT/SIGTERM.

The first request (STOP file or signal) stops after the current step, with a stop checkpoint when
saving.save_on_stop. A signal after a request (the launcher escalates with SIGTERM when the stop
takes longer than its grace period) aborts at once: KeyboardInterrupt, nothing more is saved, but
the trainer still writes its own final status and run_finished event.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any


class StopWatch:
    def __init__(self, version_dir: Path, acc: Any):
        self.stop_file = version_dir / "STOP"
        self.acc = acc
        self.signalled: str | None = None
        self.stop_seen = False  # a request (file or signal) was acted on
        self._install()

    def _install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.signalled is not None or self.stop_seen:
                raise KeyboardInterrupt  # a second request: stop now, no save
            self.signalled = signal.Signals(signum).name
            print(f"{self.signalled} received: stopping after this step (again to abort)", flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every rank as soon as any rank saw a stop request (one tiny all-reduce when distributed)."""
        local = self.signalled is not None or self.stop_file.exists()
        if self.acc.num_processes == 1:
            found = local
        else:
            if local:
                self.acc.set_trigger()
            found = bool(self.acc.check_trigger())
        self.stop_seen = self.stop_seen or found
        return found

    @property
    def reason(self) -> str:
        return f"stopped by {self.signalled}" if self.signalled else "stopped by request (STOP file)"
