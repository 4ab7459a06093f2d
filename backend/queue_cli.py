"""`python -m backend queue ...`: the run queue's commands (backend.run_queue does the work).

Exit codes: 0 ok, 2 bad input (nothing changed), 1 a failure (an unreadable queue, a failed entry);
`queue run` exits 130 when stopped by Ctrl+C (its running trainer runs on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend import launcher, runs
from backend.config import ConfigError
from backend.run_queue import (
    DEFAULT_OUTPUT_DIR,
    Queue,
    QueueError,
    QueueFileError,
    QueueRefused,
    add,
    clear_finished,
    load,
    move,
    pause,
    queue_path,
    remove,
    resume,
    run_worker,
    set_stop_on_failure,
)


def add_queue_parser(subparsers: argparse._SubParsersAction) -> None:
    """`python -m backend queue ...` (the handler is cmd_queue)."""
    p = subparsers.add_parser("queue", help="runs that wait their turn in an output folder (queue.json)")
    sub = p.add_subparsers(dest="queue_command", required=True)
    out = f"the output folder that holds the queue (default: {DEFAULT_OUTPUT_DIR})"
    a = sub.add_parser("add", help="check a config or preset and queue it")
    a.add_argument("config", help="a config or preset JSON file")
    a.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override one setting (repeatable)")
    a.add_argument("--output-dir", default=None, help="the queue's output folder (default: the config's output_dir)")
    simple = {"list": "the entries, next to start first", "pause": "start nothing more (a running entry runs on)",
              "resume": "go on starting queued entries", "clear": "drop finished, failed and stopped entries",
              "remove": "take a queued entry out", "move": "move a queued entry to POSITION (1 starts next)",
              "stop-on-failure": "pause the queue when an entry fails (on) or go on (off)",
              "run": "work the queue in the foreground until nothing is left to start"}
    for name, text in simple.items():
        s = sub.add_parser(name, help=text)
        s.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=out)
        if name in ("remove", "move"):
            s.add_argument("id", help="the entry's id (see `queue list`)")
        if name == "move":
            s.add_argument("position", type=int)
        if name == "stop-on-failure":
            s.add_argument("on", choices=("on", "off"))
        if name == "list":
            s.add_argument("--json", action="store_true", help="print queue.json's content")
        if name == "run":
            s.add_argument("--once", action="store_true", help="one round only (record ends, start the next), then exit")
    p.set_defaults(func=cmd_queue)


def cmd_queue(args: argparse.Namespace) -> int:
    """Exit 0 ok, 2 bad input (nothing changed), 1 failure (an unreadable queue, a failed entry)."""
    try:
        return _dispatch(args)
    except QueueRefused as e:
        print("not queued:", file=sys.stderr)
        for line in e.lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print("invalid configuration:", file=sys.stderr)
        for line in e.lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    except QueueFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    cmd, out = args.queue_command, args.output_dir
    if cmd == "add":
        from backend.presets import load_config_or_preset

        cfg = launcher.absolutize(load_config_or_preset(args.config, args.set))
        out = out or cfg.output_dir
        print(f"queued {add(out, cfg)} {cfg.run_name} in {queue_path(out)}")
    elif cmd == "list":
        q = load(out)
        print(q.text().rstrip() if args.json else "\n".join(describe(q, out)))
    elif cmd == "remove":
        e = remove(out, args.id)
        print(f"removed {e.id} {e.label}")
    elif cmd == "move":
        order = move(out, args.id, args.position)
        print("queued, next first: " + ", ".join(f"{e.id} {e.label}" for e in order))
    elif cmd in ("pause", "resume"):
        (pause if cmd == "pause" else resume)(out)
        print(f"queue {'paused' if cmd == 'pause' else 'resumed'}: {queue_path(out)}")
    elif cmd == "stop-on-failure":
        set_stop_on_failure(out, args.on == "on")
        print(f"stop on failure: {args.on}")
    elif cmd == "clear":
        print(f"cleared {clear_finished(out)} finished entries")
    else:
        return run_worker(out, once=args.once)
    return 0


def describe(q: Queue, output_dir: str | Path) -> list[str]:
    """`queue list`'s lines: a header, then every entry (queued ones numbered in start order)."""
    state = "paused" + (f" ({q.paused_reason})" if q.paused_reason else "") if q.paused else "active"
    lines = [f"queue {queue_path(output_dir)}: {state}, stop on failure {'on' if q.stop_on_failure else 'off'}"]
    if not q.entries:
        return [*lines, "  (empty)"]
    order = {e.id: i for i, e in enumerate(q.queued(), 1)}
    for e in q.entries:
        pos = f"{order[e.id]}." if e.id in order else "  "
        extra = e.version_dir or ""
        if e.state == "running" and e.version_dir:
            st = runs.read_status(e.version_dir)
            extra += f" (run {st.get('state', '?')}, step {st.get('step', 0)}/{st.get('total_steps') or '?'})"
        lines.append(f"  {pos:>3} {e.id}  {e.state:<8} {e.label}  {extra}".rstrip())
        if e.reason and e.state != "done":
            lines.append(f"         {e.reason}")
    return lines
