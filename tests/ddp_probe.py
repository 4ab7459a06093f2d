"""Trainer entry for the DDP tests: the real trainer (`backend.trainer`), plus what the test needs
to compare ranks. Each rank writes <run>/probe/rank<N>.safetensors (its LoRA tensors at the end)
and rank<N>-shard.json (the full epoch-0 plan and its own share of it).

Started through the real launcher as a script path in place of `-m backend.trainer`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _plan(batches: list[Any]) -> list[list[list[Any]]]:
    return [[[smp.item, smp.flip] for smp in b.samples] for b in batches]


def main() -> int:
    from safetensors.torch import save_file

    import backend.trainer.data as D
    import backend.trainer.loop as L

    seen: dict[str, Any] = {}
    real_shard, real_run = D.shard, L.run_training

    def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
        mine = real_shard(batches, rank, world)
        if "full" not in seen:  # the first call is epoch 0's plan
            seen.update(full=_plan(batches), mine=_plan(mine), rank=rank, world=world)
        return mine

    def run_training(s: Any, *args: Any, **kwargs: Any) -> str:
        state = real_run(s, *args, **kwargs)
        out = Path(s.io.dir) / "probe"
        out.mkdir(exist_ok=True)
        unet = s.acc.unwrap_model(s.unet)
        tensors = {n: p.detach().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}
        save_file(tensors, str(out / f"rank{s.acc.process_index}.safetensors"))
        (out / f"rank{s.acc.process_index}-shard.json").write_text(json.dumps(seen))
        return state

    D.shard, L.run_training = shard, run_training
    from backend.trainer.__main__ import main as trainer_main

    return trainer_main()


if __name__ == "__main__":
    sys.exit(main())
