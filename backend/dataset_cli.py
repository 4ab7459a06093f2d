"""The `python -m backend dataset` command's arguments. Its work is in backend/dataset_view.py,
imported only when the command runs: the parser is built for every CLI command, and the dataset
view imports numpy and PIL, which `train` and the others do not need before the trainer starts."""

from __future__ import annotations

import argparse


def _cmd_dataset(args: argparse.Namespace) -> int:
    from backend.dataset_view import cmd_dataset

    return cmd_dataset(args)


def add_dataset_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `dataset` command to `python -m backend`'s sub-commands."""
    p = subparsers.add_parser("dataset", help="show a dataset as training resolves it: subsets, counts, steps per "
                              "epoch, buckets, tags, warnings")
    p.add_argument("source", help="an image folder (kohya '<repeats>_<class>' layout or plain) or a config/preset file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override one setting by dotted path, e.g. --set training.train_batch_size=2 (repeatable)")
    p.set_defaults(func=_cmd_dataset)
    return p
