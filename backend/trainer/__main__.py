"""Trainer entry point: `python -m backend.trainer --run-dir VERSION_DIR [--cpu-threads N]`, started
directly for one process, or by `accelerate launch ... -m backend.trainer --run-dir VERSION_DIR`.

Sets up the process (offline hubs, quiet logs), reads the frozen config and runs the recipe
(backend/trainer/recipe.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class _NoTorchvisionNotice(logging.Filter):
    """Drop transformers' notice that torchvision is missing: Lathe uses PIL for images on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.trainer")
    ap.add_argument("--run-dir", required=True, type=Path, help="the version folder holding config.json")
    ap.add_argument("--cpu-threads", type=int, default=None, help="torch CPU threads (CPU training, one process)")
    args = ap.parse_args(argv)
    if args.cpu_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)  # before torch is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    from backend.trainer.lazy_packages import defer_package_inits

    defer_package_inits()  # diffusers' model zoos and scipy.stats: imported when first used, not at start
    import transformers  # noqa: F401 - sets up its log handler, which gets the filter

    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_NoTorchvisionNotice())
    from backend.config import load_config_file
    from backend.trainer.recipe import run

    if args.cpu_threads:
        import torch

        torch.set_num_threads(args.cpu_threads)

    return run(load_config_file(args.run_dir / "config.json"), args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
