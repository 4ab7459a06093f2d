"""The headless CLI: `python -m backend COMMAND ...` (see docs/cli.md).

Importing this module never imports torch; only the trainer process and `demo-assets` do.
"""

from __future__ import annotations

import argparse
import json
import sys

from backend.config import ConfigError, TrainingConfig, config_warnings


def _print_errors(lines: list[str]) -> None:
    print("invalid configuration:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


def _load(path: str, sets: list[str]) -> TrainingConfig:
    from backend.presets import load_config_or_preset

    return load_config_or_preset(path, sets)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config, args.set)
    except ConfigError as e:
        _print_errors(e.lines)
        return 2
    warnings = config_warnings(cfg)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        print(f"valid: {args.config}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from backend.follow import run_and_follow
    from backend.preflight import preflight

    try:
        cfg = _load(args.config, args.set)
    except ConfigError as e:
        _print_errors(e.lines)
        return 2
    problems = preflight(cfg)
    if problems:
        _print_errors(problems)
        return 2
    for w in config_warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
    return run_and_follow(cfg)


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from backend.trainer.demo import build_demo_assets

    out = build_demo_assets(args.dir)
    print(f"demo assets written to {out}")
    return 0


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from backend.kohya import import_kohya_file

    return import_kohya_file(args.src, args.output)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m backend", description="Lathe: train Stable Diffusion LoRAs headless.")
    sub = ap.add_subparsers(dest="command", required=True)
    set_help = "override one setting by dotted path, e.g. --set saving.save_last_n_epochs=2 (repeatable)"

    p = sub.add_parser("train", help="launch a run, follow its log, exit with the trainer's code")
    p.add_argument("config", help="a config or preset JSON file")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=set_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a config or preset; exit 0 when valid")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=set_help)
    p.add_argument("--json", action="store_true", help="print the full resolved config")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("demo-assets", help="build the tiny demo models and image set")
    p.add_argument("dir", nargs="?", default="demo")
    p.set_defaults(func=cmd_demo_assets)

    p = sub.add_parser("import-kohya", help="convert a kohya_ss GUI config into a Lathe preset")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_import_kohya)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        _print_errors(e.lines)
        return 2


if __name__ == "__main__":
    sys.exit(main())
