"""Lathe's web GUI: `python app.py [--host 127.0.0.1] [--port 7860] [--output-dir runs]
[--auth user:pass | --auth-file FILE] [--insecure] [--allow-host NAME ...]`.

Binding to anything but loopback needs a password (or --insecure): the GUI starts processes and
serves the output folder. There is never a public share link, and no telemetry. docs/security.md
says what else guards the port (login throttling, Host check, file serving limits).
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str, where: str) -> list[tuple[str, str]]:
    """`user:pass` lines (blank lines and # comments skipped) -> [(user, pass)]; ValueError otherwise."""
    pairs = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where} line {n}: expected user:password")
        pairs.append((user, password))
    if not pairs:
        raise ValueError(f"{where}: no user:password found")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python app.py", description="Lathe: train Stable Diffusion LoRAs in the browser.")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--output-dir", default="runs", help="folder that holds every run (default: runs)")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--auth", metavar="USER:PASS", help="require this login")
    who.add_argument("--auth-file", metavar="FILE", help="require a login from this file (user:password per line)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --host without a login (anyone who reaches the port can start runs)")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="on a loopback --host, also answer requests addressed to this host name (e.g. the name a "
                         "reverse proxy on this machine forwards with); repeatable")
    return ap


def resolve_auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    if args.auth:
        return parse_credentials(args.auth, "--auth")
    if args.auth_file:
        return parse_credentials(Path(args.auth_file).read_text(encoding="utf-8"), args.auth_file)
    return None


def check_exposure(host: str, auth: list[tuple[str, str]] | None, insecure: bool) -> str | None:
    """Why this combination must not start, or None when it may."""
    if is_loopback(host) or auth or insecure:
        return None
    return (f"refusing to listen on {host} without a login: anyone who reaches it could start processes and read "
            "your runs. Add --auth USER:PASS or --auth-file FILE (or --insecure if you really mean it); to reach "
            "a remote machine, prefer an SSH tunnel to 127.0.0.1.")


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The Host header names the server answers to: loopback names (plus --allow-host) on a loopback
    --host; any name otherwise (the login, not the name, guards an exposed port)."""
    if not is_loopback(args.host):
        return None
    from gui.security import LOOPBACK_HOSTS

    return (*LOOPBACK_HOSTS, args.host.lower(), *(h.lower() for h in args.allow_host))


def serve(args: argparse.Namespace, auth: list[tuple[str, str]] | None, block: bool = True) -> Any:
    """Build the UI and launch it; returns the Blocks (at once when block is False)."""
    # Gradio serves its own cache of uploads and shown files: keep it private to this process
    # (the shared /tmp/gradio would serve other apps' files too). Set before gradio is imported.
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="lathe-gradio-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)
    os.environ["GRADIO_EXAMPLES_CACHE"] = os.path.join(os.environ["GRADIO_TEMP_DIR"], "examples")
    from gui.queue_worker import QueueWorker
    from gui.security import password_check
    from gui.ui import build_ui, launch_kwargs

    blocks, page = build_ui(args.output_dir)
    page.output_dir.mkdir(parents=True, exist_ok=True)
    page.queue_worker = QueueWorker(page.output_dir).start()  # queued runs start while app.py runs
    print(f"Lathe: runs in {page.output_dir}", flush=True)
    blocks.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, auth=password_check(auth) if auth else None,
        prevent_thread_lock=not block, **launch_kwargs(page, allowed_hosts(args)))
    return blocks


def main(argv: list[str] | None = None, block: bool = True) -> Any:
    """0 after the server ends (or the Blocks, when block is False); 2 when it must not start."""
    args = build_parser().parse_args(argv)
    try:
        auth = resolve_auth(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_exposure(args.host, auth, args.insecure)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    blocks = serve(args, auth, block)
    return 0 if block else blocks


if __name__ == "__main__":
    sys.exit(main())
