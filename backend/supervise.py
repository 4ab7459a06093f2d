"""`python -m backend.supervise VERSION_DIR -- TRAINER ARGV...`: the small parent of a one-process run.

A one-process run starts the trainer without `accelerate launch` (launcher.direct), so nothing
would be left to see how the trainer ended when the GUI or CLI that started it is gone. This
process (the standard library and backend.runs only: a few MB, no torch) waits for the trainer and
records its end in status.json with the exit code: a trainer killed by SIGKILL (often the
out-of-memory killer) is reported as such at once, not only when someone reconciles the folder.

It ignores SIGINT and SIGTERM itself (the launcher signals the whole process group, so the trainer
gets them; a second copy would make the trainer abort instead of stopping), and exits with the
trainer's code (128 + N for a signal N).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m backend.supervise VERSION_DIR -- COMMAND...", file=sys.stderr)
        return 2
    version_dir, command = Path(args[0]), args[2:]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)  # a handler, not SIG_IGN: the child must not inherit it
    proc = subprocess.Popen(command)
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
            continue
    from backend import runs

    runs.finalize(version_dir, code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
