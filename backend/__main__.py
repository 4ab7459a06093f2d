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
    from backend.preflight import accelerate_config_problems, latent_cache_estimate

    try:
        cfg = _load(args.config, args.set)
    except ConfigError as e:
        _print_errors(e.lines)
        return 2
    problems = accelerate_config_problems(Path(cfg.launch.accelerate_config_file).expanduser()) \
        if cfg.launch.accelerate_config_file else []
    if problems:
        _print_errors(problems)
        return 2
    warnings = config_warnings(cfg)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        print(f"valid: {args.config}")
        estimate = latent_cache_estimate(cfg)
        if estimate:
            print(estimate)
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
    """Each checkpoint in turn (one process: the libraries load once); 0 when all are valid."""
    folders = [Path(c) for c in args.checkpoint]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        for f in missing:
            print(f"verify: {f} is not a folder", file=sys.stderr)
        return 2
    from backend.trainer.lazy_packages import defer_package_inits

    defer_package_inits()  # as the trainer: diffusers' model zoo imported only where a name in it is read
    from backend.trainer.verify import verify_checkpoint

    all_ok = True
    for folder in folders:
        ok, lines = verify_checkpoint(folder, recompute=not args.quick)
        for line in lines:
            print(line)
        print(("VALID: " if ok else "INVALID: ") + str(folder), flush=True)
        all_ok = all_ok and ok
    return 0 if all_ok else 1


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from backend.trainer.demo import build_demo_assets

    out = build_demo_assets(args.dir)
    print(f"demo assets written to {out}")
    return 0


def cmd_import_kohya(args: argparse.Namespace) -> int:
    from backend.kohya import import_kohya_file

    return import_kohya_file(args.src, args.output)


# ------------------------------------------------------------------- run lifecycle: runs, stop
def cmd_runs(args: argparse.Namespace) -> int:
    from backend.runs import list_runs

    infos = list_runs(args.output_dir)
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=1))
        return 0
    if not infos:
        print(f"no runs in {args.output_dir}")
        return 0
    for i in infos:
        steps = f"{i.step}/{i.total_steps if i.total_steps is not None else '?'}"
        print(f"{i.run_name}/version_{i.version}  {i.state:<9} step {steps:<12} {i.path}")
        if i.worker_of:
            print(f"    {i.worker_of} (no checkpoints here: they are on the main machine)")
        if i.reason and i.state != "finished":
            print(f"    {i.reason}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from backend import launcher, runs

    v = Path(args.version_dir).expanduser().resolve()
    if not (v / "status.json").is_file():
        _print_errors([f"stop: {v} is not a version folder (no status.json); list runs with `python -m backend runs`"])
        return 2
    status = runs.reconcile(v)
    if args.kill:
        status = launcher.kill(v)
    elif status.get("state") in runs.FINAL_STATES:
        print(f"run already {status['state']}: {v}")
        return 0
    elif args.no_wait:
        launcher.request_stop(v)
        print(f"stop requested: {v} (the trainer saves a stop checkpoint and exits after its current step)")
        return 0
    else:
        print(f"stopping {v} (waiting up to {args.grace:.0f} s for the stop checkpoint, then terminating)", flush=True)
        status = launcher.stop(v, grace_s=args.grace, term_s=args.term)
    reason = f" ({status['error']})" if status.get("error") else ""
    print(f"run {status.get('state', 'unknown')}: {v}{reason}")
    return 0 if status.get("state") in runs.FINAL_STATES else 1


def _add_lifecycle_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list every version with its state; marks runs whose process died as failed")
    p.add_argument("output_dir", nargs="?", default="runs", help="the output folder (default: runs)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per version")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stop", help="stop a run gracefully (stop checkpoint), or kill its whole process tree")
    p.add_argument("version_dir", help="the run's version folder, e.g. runs/NAME/version_0")
    p.add_argument("--kill", action="store_true", help="SIGKILL every process of the run now (nothing is saved)")
    p.add_argument("--no-wait", action="store_true", help="only write the STOP file and return")
    p.add_argument("--grace", type=float, default=120.0, metavar="S", help="seconds to wait for the stop checkpoint (default 120)")
    p.add_argument("--term", type=float, default=30.0, metavar="S",
                   help="seconds to wait after SIGTERM before SIGKILL of the whole tree (default 30)")
    p.set_defaults(func=cmd_stop)


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

    p = sub.add_parser("verify", help="verify checkpoints: hashes, tensors, shapes, and each stored loss recomputed")
    p.add_argument("checkpoint", nargs="+", help="one or more checkpoint folders (exit 0 when all are valid)")
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
    _add_lifecycle_commands(sub)
    from backend.dataset_cli import add_dataset_parser
    from backend.queue_cli import add_queue_parser

    add_dataset_parser(sub)
    add_queue_parser(sub)
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
