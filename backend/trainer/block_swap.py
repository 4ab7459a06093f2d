"""`training.blocks_to_swap`: the frozen weights of the last N transformer blocks of an SD3 or Flux.1
denoiser live in CPU memory, and each block is copied to the GPU just before it runs (forward, and
again for its backward), then dropped: sd-scripts' `--blocks_to_swap`.

Which blocks, as sd-scripts counts them (library/flux_models.py, sd3_models.py `enable_block_swap`):
- SD3: the last N of `transformer_blocks`; at most (blocks - 2).
- Flux.1: N // 2 of the double blocks (`transformer_blocks`) and 2 * (N - N // 2) of the single
  blocks (`single_transformer_blocks`), the last ones of each; at most (blocks - 2) of each kind,
  so N is at most 35 for Flux.1 dev/schnell (19 double, 38 single blocks).

How (sd-scripts instead rotates which blocks sit on the GPU and copies weights into the storage of
the block leaving; Lathe keeps the set fixed, which is simpler to reason about and to test):
- A swapped block's frozen parameters have a home copy in CPU memory (pinned on CUDA). While the
  block is out, each parameter's `.data` is an empty placeholder on the compute device, so a use of an
  out block fails loudly instead of running on the wrong device. The network's parameters (LoRA, DoRA
  scale) and buffers stay on the device.
- A forward pre-hook brings the block in, a forward hook sends it out. On CUDA the next swapped block
  is copied ahead on a side stream; the compute stream waits on its event before using it.
- Backward, without gradient checkpointing: while the block runs, saved-tensor hooks store each
  saved tensor that is (a view of) one of its swapped weights as a reference (the parameter and the
  view's geometry), not the tensor, so the GPU copy can go. An identity autograd Function on the
  block's outputs brings the block in before any of its backward runs, one on its inputs sends it out
  once its input gradients are done, and a callback at the end of each backward pass sends every block
  out (a block whose inputs need no gradient).
- With gradient checkpointing (diffusers' non-reentrant checkpoint) the block's forward runs again in
  backward: the pre-hook brings the block in for it, and the checkpoint keeps its own (detached)
  references to what it recomputes, so the block can go out at any time after. Block swap then adds no
  autograd hooks of its own.
- Under no_grad (sampling, evaluation) blocks only go in and out.

Attach after the network is injected and after `model.fp8_base`'s cast, before accelerate wraps the
model: DDP's first broadcast must skip the placeholders (they are added to
`_ddp_params_and_buffers_to_ignore`, as the fp8 weights are). It does not work under torch.compile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from backend.trainer import network

CPU_WARNING = "training.blocks_to_swap: ignored on the CPU (it saves GPU memory; the model is in CPU memory already)"


# ------------------------------------------------------------------------------------------ which blocks
def swapped_blocks(model: torch.nn.Module, blocks_to_swap: int) -> tuple[list[tuple[str, torch.nn.Module]], str | None]:
    """The (name, block) pairs that swap, in the order they run, or ([], a message naming the setting)."""
    n = blocks_to_swap
    if hasattr(model, "single_transformer_blocks") and hasattr(model, "transformer_blocks"):
        doubles, singles = model.transformer_blocks, model.single_transformer_blocks
        n_double, n_single = n // 2, (n - n // 2) * 2
        if n_double > len(doubles) - 2 or n_single > len(singles) - 2:
            most = max((k for k in range(n + 1) if k // 2 <= len(doubles) - 2 and (k - k // 2) * 2 <= len(singles) - 2),
                       default=0)
            return [], (f"training.blocks_to_swap: {n} is more than this Flux.1 transformer allows, at most {most} "
                        f"(it has {len(doubles)} double and {len(singles)} single blocks; N swaps N // 2 double and "
                        f"2 * (N - N // 2) single blocks, and at least 2 of each stay on the GPU, as in sd-scripts)")
        return (_tail("transformer_blocks", doubles, n_double) + _tail("single_transformer_blocks", singles, n_single)), None
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder"):
        blocks = model.transformer_blocks
        if n > len(blocks) - 2:
            return [], (f"training.blocks_to_swap: {n} is more than this SD3 transformer allows, at most "
                        f"{max(len(blocks) - 2, 0)} (it has {len(blocks)} blocks, and at least 2 stay on the GPU, as in "
                        "sd-scripts)")
        return _tail("transformer_blocks", blocks, n), None
    return [], (f"training.blocks_to_swap: applies to SD3 and Flux.1 transformers, not to this model "
                f"({type(model).__name__}); set it to 0")


def _tail(name: str, blocks: torch.nn.ModuleList, k: int) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{name}.{i}", blocks[i]) for i in range(len(blocks) - k, len(blocks))]


def check(model: torch.nn.Module, blocks_to_swap: int, device: torch.device,
          torch_compile: bool = False) -> tuple[list[str], list[str]]:
    """(errors, warnings) for this setting on this model and device, as plain messages."""
    if blocks_to_swap == 0:
        return [], []
    _, problem = swapped_blocks(model, blocks_to_swap)
    errors = [problem] if problem else []
    if torch_compile:
        errors.append("training.blocks_to_swap: does not work with training.torch_compile (the weights change "
                      "under the compiled graph); turn one of them off")
    warnings = [CPU_WARNING] if device.type != "cuda" and not errors else []
    return errors, warnings


# ------------------------------------------------------------------------------------------ the swapper
@dataclass(frozen=True)
class _WeightRef:
    """A saved tensor that is a view of a swapped weight: rebuilt from the weight's data at unpack."""

    param: torch.nn.Parameter
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class Swapper:
    """Keeps `blocks` (run order) out of device memory except while they run. `detach()` undoes it."""

    def __init__(self, model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], device: torch.device):
        self.model, self.device, self.names = model, device, [n for n, _ in blocks]
        self.blocks = [b for _, b in blocks]
        self.cuda = device.type == "cuda"
        self.homes: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        for _, block in blocks:
            self.homes.append([(p, self._home(p)) for n, p in block.named_parameters()
                               if not p.requires_grad and not network.is_network_param(n)])
        self.state: dict[int, str] = {}  # index -> "fwd" | "bwd" while in; absent while out
        self.pending: dict[int, tuple[list[torch.Tensor], Any]] = {}  # CUDA prefetches: data, event
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.callback_queued = False
        self.packed = 0  # weight views saved for backward as references (a count, for tests and reports)
        self.handles: list[Any] = []
        self._saving: dict[int, Any] = {}  # index -> the saved_tensors_hooks context of its running forward
        for i in range(len(self.blocks)):
            self.send_out(i)
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post_hook(i), with_kwargs=True))

    def _home(self, p: torch.nn.Parameter) -> torch.Tensor:
        home = p.data.detach().to("cpu")
        if self.cuda:
            home = home.pin_memory()
        return home

    def is_in(self, i: int) -> bool:
        return i in self.state

    def line(self) -> str:
        """What is swapped, for the run's log."""
        mb = sum(h.numel() * h.element_size() for homes in self.homes for _, h in homes) / 2**20
        return (f"training.blocks_to_swap: the frozen weights of {len(self.blocks)} blocks ({mb:.1f} MB: "
                f"{self.names[0]} ... {self.names[-1]}) stay in CPU memory, each copied in as it runs")

    # -------------------------------------------------------------------------------- moving
    def bring_in(self, i: int, why: str) -> None:
        if i in self.state:
            if why == "bwd":
                self.state[i] = why  # kept until its backward is done
            return
        with torch.inference_mode(False):  # under inference_mode the weights would become inference tensors
            datas, event = self.pending.pop(i, (None, None))
            if datas is None:
                # a copy on the CPU too (tests), so that a stale reference to an old copy cannot pass for the data
                datas = [home.to(self.device, non_blocking=self.cuda, copy=True) for _, home in self.homes[i]]
            else:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for d in datas:
                    d.record_stream(compute)  # freed at send_out: not reused before compute is done with it
            for (p, _), d in zip(self.homes[i], datas, strict=True):
                p.data = d
        self.state[i] = why

    def send_out(self, i: int) -> None:
        self.state.pop(i, None)
        with torch.inference_mode(False):
            for p, _ in self.homes[i]:
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)

    def send_all_out(self) -> None:
        self.callback_queued = False
        self.pending.clear()
        for i in range(len(self.blocks)):
            self.send_out(i)

    def prefetch(self, i: int) -> None:
        """CUDA: start copying block i in on the side stream (bring_in waits for it)."""
        if not self.cuda or not 0 <= i < len(self.blocks) or i in self.state or i in self.pending:
            return
        with torch.inference_mode(False), torch.cuda.stream(self.stream):
            datas = [home.to(self.device, non_blocking=True) for _, home in self.homes[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (datas, event)

    def queue_send_all_out(self) -> None:
        """At the end of the backward pass now running, every block goes out."""
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.send_all_out)

    # -------------------------------------------------------------------------------- hooks
    def _pre_hook(self, i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            for j, why in list(self.state.items()):
                if why == "fwd" and j != i:  # a forward that never reached its forward hook (an error,
                    self.send_out(j)  # or a checkpoint recompute stopped early)
            for j in list(self._saving):  # a forward that raised: its saved-tensor hooks are still on top
                self._saving.pop(j).__exit__(None, None, None)
            in_backward = torch._C._current_graph_task_id() != -1
            self.bring_in(i, "fwd")
            self.prefetch(i - 1 if in_backward else i + 1)
            if in_backward:
                self.queue_send_all_out()
            if _saves_for_backward(self.model):
                args, kwargs = _through(_SendOut, self, i, (args, kwargs))
                ctx = torch.autograd.graph.saved_tensors_hooks(self._packer(i), _unpack)
                ctx.__enter__()
                self._saving[i] = ctx
            return args, kwargs

        return hook

    def _post_hook(self, i: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            ctx = self._saving.pop(i, None)
            if ctx is not None:
                ctx.__exit__(None, None, None)
                output = _through(_BringIn, self, i, output)
            self.send_out(i)
            return output

        return hook

    def _packer(self, i: int) -> Callable[[torch.Tensor], Any]:
        by_ptr = {p.data.untyped_storage().data_ptr(): p for p, _ in self.homes[i] if p.data.numel() > 0}

        def pack(t: torch.Tensor) -> Any:
            try:
                p = by_ptr.get(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # a tensor without storage
                return t
            if p is None or t.dtype != p.dtype or t.device != p.device:
                return t
            self.packed += 1
            return _WeightRef(p, t.size(), t.stride(), t.storage_offset())

        return pack

    def detach(self) -> None:
        """Remove the hooks and put every swapped weight back on the device."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()
        with torch.inference_mode(False):
            for homes in self.homes:
                for p, home in homes:
                    p.data = home.to(self.device)
        self.state.clear()


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, _WeightRef):  # the block is in again (_BringIn ran); an out block fails here
        return saved.param.data.as_strided(saved.size, saved.stride, saved.offset)
    return saved


def _saves_for_backward(model: torch.nn.Module) -> bool:
    """Whether autograd will save this forward's tensors the ordinary way (so Lathe's hooks must keep the
    weights' references): grad mode on, and no other saved-tensor hooks (a checkpoint's) already active."""
    if not torch.is_grad_enabled():
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        return top(False) is None
    return not getattr(model, "gradient_checkpointing", False)


class _BringIn(torch.autograd.Function):
    """Identity on a block's outputs; its backward brings the block in before the block's own backward."""

    @staticmethod
    def forward(ctx: Any, swapper: Swapper, i: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swapper, ctx.i = swapper, i
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        ctx.swapper.bring_in(ctx.i, "bwd")
        ctx.swapper.prefetch(ctx.i - 1)
        ctx.swapper.queue_send_all_out()
        return (None, None, *grads)


class _SendOut(torch.autograd.Function):
    """Identity on a block's inputs; its backward (the block's input gradients are done) sends it out."""

    @staticmethod
    def forward(ctx: Any, swapper: Swapper, i: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.swapper, ctx.i = swapper, i
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        ctx.swapper.send_out(ctx.i)
        return (None, None, *grads)


def _through(fn: type[torch.autograd.Function], swapper: Swapper, i: int, obj: Any) -> Any:
    """`obj` (tensors in tuples, lists and dicts) with every tensor that needs a gradient passed through
    one call of the identity Function `fn`."""
    found: list[torch.Tensor] = []
    _walk(obj, lambda t: found.append(t) or t)
    if not found:
        return obj
    out = fn.apply(swapper, i, *found)
    it = iter(out if isinstance(out, tuple) else (out,))
    return _walk(obj, lambda t: next(it))


def _walk(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.requires_grad else obj
    if isinstance(obj, tuple):
        return type(obj)(*(_walk(x, fn) for x in obj)) if hasattr(obj, "_fields") else tuple(_walk(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_walk(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------ entry points
def attach(model: torch.nn.Module, blocks_to_swap: int, device: torch.device, force: bool = False) -> Swapper | None:
    """Swap `blocks_to_swap` blocks of `model` (see the module docstring) and move the rest of the model
    to `device`. None when 0, or on a CPU device unless `force` (tests: the same mechanics on the CPU);
    ValueError with check()'s message when the setting does not fit the model."""
    if blocks_to_swap == 0:
        return None
    errors, _ = check(model, blocks_to_swap, device)
    if errors:
        raise ValueError("; ".join(errors))
    if device.type != "cuda" and not force:
        return None
    blocks, _ = swapped_blocks(model, blocks_to_swap)
    swapper = Swapper(model, blocks, device)
    model.to(device)  # everything else; the placeholders are there already
    swapped = {id(p) for homes in swapper.homes for p, _ in homes}
    names = [n for n, p in model.named_parameters() if id(p) in swapped]
    model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", []), *names]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return swapper
