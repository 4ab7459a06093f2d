"""The headless CLI: `python -m backend COMMAND ...` (see docs/cli.md).

Importing this module never imports torch; only the trainer process and `demo-assets` do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    if cfg.resume_from and not problems:
        from backend.resume import plan_resume

        plan = plan_resume(cfg.resume_from, cfg)
        for line in plan.describe():
            print(line, file=sys.stderr)
        problems = [f"resume_from: {r}" for r in plan.refused]
    if problems:
        _print_errors(problems)
        return 2
    for w in config_warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
    return run_and_follow(cfg)


def cmd_resume(args: argparse.Namespace) -> int:
    from backend.follow import run_and_follow
    from backend.launcher import absolutize
    from backend.preflight import preflight
    from backend.presets import read_json_object, resolve
    from backend.resume import plan_resume

    ckpt = Path(args.checkpoint).expanduser().resolve()
    if not (ckpt / "config.json").is_file():
        _print_errors([f"resume: {ckpt} is not a checkpoint folder (no config.json); list them with "
                       "`python -m backend checkpoints RUN_DIR`"])
        return 2
    try:
        data = read_json_object(ckpt / "config.json")
        cfg = absolutize(resolve({**data, "resume_from": str(ckpt)}, args.set))
    except ConfigError as e:
        _print_errors(e.lines)
        return 2
    plan = plan_resume(ckpt, cfg)
    for line in plan.describe():
        print(line, file=sys.stderr if not plan.ok else sys.stdout)
    problems = preflight(cfg)
    if not plan.ok or problems:
        if problems:
            _print_errors(problems)
        return 2
    return run_and_follow(cfg)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from backend.checkpoints import best, latest, list_checkpoints

    path = Path(args.dir)
    if not path.is_dir():
        print(f"checkpoints: {path} is not a folder", file=sys.stderr)
        return 2
    cks = list_checkpoints(path)
    if args.json:
        print(json.dumps([{k: v for k, v in c.items() if k != "problems"} for c in cks], indent=1))
        return 0
    last, top = latest(cks), best(cks)
    if not cks:
        print(f"no checkpoints in {path}")
    for c in cks:
        marks = " ".join(m for m, on in (("last", c is last), ("best", c is top)) if on)
        loss = f"{c['loss']:.4f}" if isinstance(c["loss"], float) else "-"
        val = f"{c['val_loss']:.4f}" if isinstance(c["val_loss"], float) else "-"
        size = f"{(c['bytes'] or 0) / 1e6:.1f}MB"
        print(f"{c['version']}/{c['name']:<16} {c['status']:<15} step {c['step']!s:>7} epoch {c['epoch']!s:>4} "
              f"loss {loss:>7} val {val:>7} {size:>8} {marks}")
        for p in c["problems"][:3]:
            print(f"    {p}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from backend.trainer.verify import verify_checkpoint

    folder = Path(args.checkpoint)
    if not folder.is_dir():
        print(f"verify: {folder} is not a folder", file=sys.stderr)
        return 2
    ok, lines = verify_checkpoint(folder, recompute=not args.quick)
    for line in lines:
        print(line)
    print(("VALID: " if ok else "INVALID: ") + str(folder))
    return 0 if ok else 1


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

    p = sub.add_parser("resume", help="resume training from a checkpoint folder in a new version")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/NAME/version_0/checkpoints/epoch-000003")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=set_help)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("checkpoints", help="list the checkpoints of a run or version folder with their status")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser("verify", help="verify a checkpoint: hashes, tensors, shapes, and its stored loss recomputed")
    p.add_argument("checkpoint")
    p.add_argument("--quick", action="store_true", help="hashes and loading only; do not run the model")
    p.set_defaults(func=cmd_verify)

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
