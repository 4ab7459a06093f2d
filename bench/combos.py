"""Combination campaign: train the demo under the first N combinations of a seeded pairwise-covering
set of settings (model, text-encoder training, dropout, alpha, batch, accumulation, caching,
captions, flips, buckets, validation, clip skip, noise offset, Min-SNR, v-prediction, every CPU
optimizer and scheduler, 1 or 2 processes), resume each from a mid-epoch step checkpoint, and check
that losses and the final LoRA are bit-identical, every checkpoint verifies and DDP ranks agree.

    .venv/bin/python bench/combos.py [--n 50] [--seed 0] [--json out.json] [--keep] [--workdir DIR]

Beyond the covering set's size, random valid combinations are added. Exit code 0 only when every
combination passed. Not part of the default test run: tests/test_combos.py runs a few of them; the
factor space, the runs and the checks live in tests/combo_helpers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import combo_helpers as H  # noqa: E402


def summarize(results: list[H.Result]) -> dict[str, Any]:
    """Counts, and for each check how many combinations failed it."""
    failed = [r for r in results if not r.passed]
    by_check = {c: sum(1 for r in results if r.checks.get(c) is False) for c in H.CHECKS}
    return {"run": len(results), "passed": len(results) - len(failed), "failed": len(failed),
            "failed_checks": {c: n for c, n in by_check.items() if n},
            "failures": {r.label: r.failed or ["did not finish"] for r in failed}}


def print_summary(summary: dict[str, Any], results: list[H.Result]) -> None:
    print(f"\ncombinations run: {summary['run']}, passed: {summary['passed']}, failed: {summary['failed']}")
    for check, n in summary["failed_checks"].items():
        print(f"  {check}: failed in {n}")
    for r in results:
        if not r.passed:
            print(r.summary())


def campaign(root: Path, n: int, seed: int, demo: Path | None, keep: bool) -> tuple[dict[str, Any], list[H.Result]]:
    """Demo assets (built unless given), then every combination in turn; the JSON report."""
    from backend.trainer.demo import build_demo_assets

    t0 = time.monotonic()
    demo = demo or build_demo_assets(root / "assets" / "demo")
    combos = H.combinations(n, seed)
    results: list[H.Result] = []
    for i, (label, combo) in enumerate(combos, 1):
        print(f"[{i}/{len(combos)}] {label}: {H.describe(combo)}", flush=True)
        work = root / label
        try:
            r = H.run_combination(combo, demo, work, label=label)
        except Exception as e:  # noqa: BLE001 - a harness error is reported, and the campaign goes on
            r = H.Result(label, combo, errors=[f"{type(e).__name__}: {e}"])
        results.append(r)
        verdict = "PASS" if r.passed else f"FAIL {','.join(r.failed) or 'error'}"
        print(f"    {verdict} ({r.seconds.get('total', 0):.0f} s)", flush=True)
        if not r.passed:
            print("\n".join(r.summary().splitlines()[1:]), flush=True)
        if not keep and r.passed:
            shutil.rmtree(work, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    report = {"summary": summarize(results), "seconds": round(time.monotonic() - t0, 1), "seed": seed,
              "machine": machine, "space": H.SPACE, "results": [r.to_json() for r in results]}
    return report, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="combinations to run (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pairwise list (default 0)")
    ap.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "lathe-combos.json",
                    help="where to write the JSON report (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep every run folder (default: only failing ones)")
    ap.add_argument("--workdir", type=Path, help="work here (default: a temp folder; removed unless --keep or a failure)")
    ap.add_argument("--demo", type=Path, help="existing demo assets (with model-sd2v/) instead of building them")
    args = ap.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lathe-combos-"))
    report, results = campaign(root, args.n, args.seed, args.demo, args.keep)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_summary(report["summary"], results)
    ok = report["summary"]["failed"] == 0
    if args.workdir is None and ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"run folders: {root}")
    print(f"report: {args.json} ({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
