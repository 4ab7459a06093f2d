"""What is trained: the one list of trained modules.

Every part of the trainer that needs to know which modules train asks this list and nothing else:
the DDP wrapping and the forward pass (`runner`), `no_sync` during gradient accumulation, train and
eval mode, the optimizer's parameter groups, the state file (save and load), the export and
`verify`. A new network type or text encoder is added here once, so it cannot be half wired.

Frozen modules (the UNet when only text encoders train, text encoders when they do not) are never
wrapped and stay in eval mode throughout.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from backend.config import UNET_TARGETS_DEFAULT, TrainingConfig
from backend.trainer import export, network

UNET = "unet"
TEXT_ENCODER = "text_encoder"


class RanksDiverged(Exception):
    """Processes that should hold one model hold different ones; the message names a tensor."""


@dataclass
class TrainedModule:
    key: str  # prefix of its tensors in the state file: "unet", "text_encoder_0", "text_encoder_1"
    role: str  # UNET or TEXT_ENCODER
    index: int  # position among the text encoders (0 for the UNet)
    module: torch.nn.Module  # the bare module, adapters injected: save, export, evaluate, sample
    runner: Any  # what the training forward pass calls: the DDP (or compiled) wrapper after prepare


class Trained:
    """The trained modules of one run, and every operation that must treat them all alike."""

    def __init__(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], entries: list[TrainedModule]):
        self.unet, self.text_encoders, self.entries = unet, list(text_encoders), entries

    # ------------------------------------------------------------------------------ building
    @classmethod
    def for_components(cls, cfg: TrainingConfig, comps: Any) -> Trained:
        """attach() as the trainer and `verify` build it for loaded components (their family's targets and
        trained text encoders)."""
        spec = comps.spec
        return cls.attach(cfg, comps.unet, comps.text_encoders, spec.default_targets(comps.unet),
                          spec.trained_text_encoders(len(comps.text_encoders)))

    @classmethod
    def attach(cls, cfg: TrainingConfig, unet: torch.nn.Module, text_encoders: list[torch.nn.Module],
               default_targets: list[str] | None = None, text_encoder_indices: list[int] | None = None) -> Trained:
        """Inject the network into what the config trains, freeze the rest, set every mode.
        `text_encoder_indices`: the encoders a text-encoder LoRA trains (the family's
        trained_text_encoders; all when None).

        The modules are changed in place (they are the loaded components); network weights are fp32."""
        net = cfg.network
        entries: list[TrainedModule] = []
        for m in (unet, *text_encoders):
            m.requires_grad_(False)
        if net.train_unet:
            targets = net.target_modules
            if default_targets is not None and targets == UNET_TARGETS_DEFAULT:  # left at the SD default
                targets = default_targets
            network.inject(unet, net, targets, "unet", with_conv=True)
            entries.append(TrainedModule(UNET, UNET, 0, unet, unet))
        if net.train_text_encoder:
            for i, te in enumerate(text_encoders):
                if text_encoder_indices is not None and i not in text_encoder_indices:
                    continue
                network.inject(te, net, net.text_encoder_target_modules, "text encoder")
                entries.append(TrainedModule(f"{TEXT_ENCODER}_{i}", TEXT_ENCODER, i, te, te))
        for e in entries:
            for p in network.network_parameters(e.module):
                p.data = p.data.float()
        if cfg.training.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for e in entries:
                if e.role == TEXT_ENCODER:
                    e.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = cls(unet, text_encoders, entries)
        out.train_mode()
        return out

    def prepare(self, acc: Any, optimizer: Any, compile_unet: bool = False) -> Any:
        """Wrap every trained module for distributed training (one call, so accelerate sees them all);
        returns the prepared optimizer. The forward pass then goes through `runner`."""
        prepared = acc.prepare(*[e.module for e in self.entries], optimizer)
        for e, wrapped in zip(self.entries, prepared[:-1], strict=True):
            e.runner = wrapped
            if compile_unet and e.role == UNET:
                e.runner = torch.compile(wrapped)
        return prepared[-1]

    # ------------------------------------------------------------------------------ the forward pass
    def unet_runner(self) -> Any:
        """The UNet to call in a training step (the wrapper when it trains, else the frozen module)."""
        return next((e.runner for e in self.entries if e.role == UNET), self.unet)

    def text_encoder_runners(self) -> list[Any]:
        """The text encoders to call in a training step, in order."""
        by_index = {e.index: e.runner for e in self.entries if e.role == TEXT_ENCODER}
        return [by_index.get(i, te) for i, te in enumerate(self.text_encoders)]

    @contextlib.contextmanager
    def no_sync(self, acc: Any, active: bool) -> Iterator[None]:
        """Skip the gradient all-reduce of every trained module (accumulation micro-steps)."""
        with contextlib.ExitStack() as stack:
            if active and acc.num_processes > 1:
                for e in self.entries:
                    stack.enter_context(acc.no_sync(e.runner))
            yield

    # ------------------------------------------------------------------------------ modes
    def train_mode(self) -> None:
        """Trained modules in train mode (LoRA dropout live), frozen ones in eval mode."""
        trained = {id(e.module) for e in self.entries}
        for m in (self.unet, *self.text_encoders):
            m.train(id(m) in trained)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Every module in eval mode (no dropout) for evaluation and sampling; train mode after."""
        for m in (self.unet, *self.text_encoders):
            m.eval()
        try:
            yield
        finally:
            self.train_mode()

    # ------------------------------------------------------------------------------ parameters and state
    def parameters(self, role: str | None = None) -> list[torch.nn.Parameter]:
        return [p for e in self.entries if role in (None, e.role) for p in network.network_parameters(e.module)]

    def up_projections(self) -> set[int]:
        """ids of the LoRA up-projection tensors (peft's lora_B; kohya's lora_up): what LoRA+ speeds up."""
        return {id(p) for e in self.entries for n, p in e.module.named_parameters()
                if network.is_network_param(n) and "lora_B" in n.split(".")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, as `<key>.<peft name>` (detached fp32 CPU copies)."""
        return {f"{e.key}.{k}": v for e in self.entries for k, v in network.trainable_state(e.module).items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore every trainable tensor; anything missing, extra or of another shape is a ValueError."""
        keys = {e.key for e in self.entries}
        stray = sorted({k.split(".", 1)[0] for k in tensors} - keys)
        if stray:
            raise ValueError(f"the checkpoint holds tensors of {stray}, which this configuration does not train")
        for e in self.entries:
            prefix = e.key + "."
            network.load_trainable_state(e.module, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def start_from(self, path: str, spec: Any) -> list[str]:
        """Set the network's weights from a LoRA/LyCORIS file (network.network_weights); returns the
        stems of the network's modules the file does not hold (they keep their fresh start)."""
        found, fresh = export.read_network_file(path, self.export_groups(spec), self.export_groups(spec, ldm=False))
        with torch.no_grad():
            for gi, tensors in found.items():
                params = dict(self.entries[int(gi)].module.named_parameters())
                for name, t in tensors.items():
                    params[name].copy_(t.to(params[name].device, params[name].dtype))
        return fresh

    def fingerprints(self) -> list[tuple[str, str]]:
        """(state name, digest of its bytes) for every trainable tensor: equal on every rank of a
        healthy distributed run, bit for bit."""
        out = []
        for name, t in self.state_dict().items():
            out.append((name, hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest()))
        return out

    def export_groups(self, spec: Any, ldm: bool = True) -> list[export.Group]:
        """(kohya key prefix, module, is a text encoder, module name map) for each trained module, as
        the family names them (`spec`: backend.trainer.families). SDXL's UNet modules carry their
        original (LDM) names, as sd-scripts writes them, unless `ldm` is off (diffusers names, which
        Lathe also reads)."""
        return [(spec.model_prefix(), e.module, False, spec.model_module_names(self.unet.config, ldm)) if e.role == UNET
                else (spec.text_encoder_prefix(e.index), e.module, True, str) for e in self.entries]


def first_divergence(per_rank: list[list[tuple[str, str]]]) -> str | None:
    """The first tensor whose fingerprint differs between rank 0 and another rank, as a message."""
    reference = per_rank[0]
    for rank, prints in enumerate(per_rank[1:], start=1):
        for (name, want), (_, got) in zip(reference, prints, strict=True):
            if want != got:
                return f"ranks diverged: {name} differs between rank 0 and rank {rank}"
    return None


def ddp_kwargs(cfg: TrainingConfig) -> dict[str, Any]:
    """DistributedDataParallel options for the trained modules. A trained text encoder has LoRA
    layers whose output the loss never reads (the layers after the one clip_skip picks; SDXL's first
    encoder's last layer), and module dropout skips whole modules in a step, so in either case DDP must
    not wait for every gradient (a module skipped on every rank keeps no gradient, and the optimizer
    leaves it alone that step, as in one process)."""
    return {"find_unused_parameters": bool(cfg.network.train_text_encoder or cfg.network.module_dropout > 0)}
