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
        self._group: Any = None
        self._pending: tuple[Any, Any] | None = None
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
        """Called once per step on every rank; True on every rank at the same step once any rank saw
        a stop request. Under several processes the ranks agree through an asynchronous all-reduce
        of a CPU flag on a gloo group of its own: started at one step and read at the next (by then
        long complete), it never waits on the GPU, so the step costs no host sync. The stop then
        comes one step later than on a single process."""
        local = self.signalled is not None or self.stop_file.exists()
        if self.acc.num_processes == 1:
            found = local
        else:
            found = self._agreed(local)
        self.stop_seen = self.stop_seen or found
        return found

    def _agreed(self, local: bool) -> bool:
        import torch
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")  # every rank reaches its first step: collective is safe
        found = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            found = bool(flag.item())
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return found

    def close(self) -> None:
        """Complete the outstanding agreement (every rank calls it once training ends)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    @property
    def reason(self) -> str:
        return f"stopped by {self.signalled}" if self.signalled else "stopped by request (STOP file)"
