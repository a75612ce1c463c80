"""The adaptations megatron-core 0.16 needs to run on a CPU-only torch over gloo.

Each item below was shown necessary (``../shared/notes/megatron-on-cpu.md``); nothing else is
touched and no megatron-core module is copied:

1. ``torch.cuda.current_device`` places buffers (TP mappings, attention workspace, p2p
   receive buffers): it answers the CPU device.
2. ``torch.cuda.synchronize`` / ``set_device``: no-ops. Streams, events and nvtx ranges:
   inert stand-ins (only megatron's inference paths use them).
3. RNG tracker: megatron forks CUDA generator states even with dropout 0; the tracker is
   backed by the CPU generator instead.
4. A process-wide ``TorchFunctionMode`` turns hard-coded ``device="cuda"``, ``.cuda()``,
   ``pin_memory`` requests (pipeline schedules, DDP, optimizer) into CPU ones, and makes
   ``Tensor.type()`` report the ``torch.cuda.*Tensor`` names the optimizer compares against
   (``is_cuda`` stays False; our own code never compares ``.type()`` strings).
5. The local spec's torch norm wrapper refuses sequence parallelism; it is allowed, with the
   norm parameters marked ``sequence_parallel`` so ``finalize_model_grads`` sums their
   gradients across the TP group.
6. MoE all-to-all split sizes: the token dispatcher converts them to numpy only when they are
   CUDA tensors (``moe_utils.maybe_move_tensor_to_cpu``); on CPU they stay tensors, which
   ``all_to_all_single`` refuses. The CPU tensors are converted the same way.
7. Uneven gathers and reduce-scatters along the first dimension (the MoE dispatcher over an
   expert tensor-parallel group, ``output_split_sizes`` / ``input_split_sizes``): gloo's
   ``all_gather`` needs equal sizes and it has no ``reduce_scatter``. The uneven cases are
   computed as a padded all-gather and as an all-reduce followed by this rank's slice; the
   even ones are megatron's own.

Replacements accept any arguments (``*args, **kwargs``) and wrappers pass them through
unchanged; the parameters a patch reads are checked when it is applied, so a signature change
upstream stops the layer at start-up instead of breaking a call later.

Pipeline p2p ordering over gloo and the fusions a CPU cannot run are config settings, not
patches: see ``megatron_erc.platform.distributed.adapt_parallel_config`` and
``megatron_erc.platform.transformer_config``.

Apply with :func:`apply` once at start-up on CPU only (``megatron_erc.platform.setup`` does
this); a second call changes nothing. Never apply it on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch
from torch.overrides import TorchFunctionMode

from megatron_erc.platform.version import require_supported_megatron

_lock = threading.Lock()
_applied = False
_mode: TorchFunctionMode | None = None


class CpuLayerError(RuntimeError):
    """A symbol the layer adapts moved, or the layer was asked to run on a CUDA machine."""


def is_applied() -> bool:
    return _applied


def apply() -> None:
    """Apply every adaptation once. Raises ``UnsupportedMegatronError`` on another
    megatron-core release line and ``CpuLayerError`` if a patched symbol moved."""
    global _applied, _mode
    with _lock:
        if _applied:
            return
        if torch.cuda.is_available():
            raise CpuLayerError("the CPU layer must never be applied on a CUDA machine")
        require_supported_megatron("the CPU platform layer")
        _patch_cuda_namespace()
        _patch_rng_tracker()
        _patch_torch_norm()
        _patch_moe_split_sizes()
        _patch_uneven_first_dim_collectives()
        _mode = _CpuDeviceMode()
        _mode.__enter__()  # process-wide on purpose: megatron allocates from many places
        _applied = True


def _require(owner, name: str):
    if not hasattr(owner, name):
        raise CpuLayerError(
            f"{getattr(owner, '__name__', owner)}.{name} is missing: this megatron-core/torch "
            "release moved a symbol the CPU layer adapts; pin megatron-core==0.16.1")
    return getattr(owner, name)


# --- 1, 2: the torch.cuda calls megatron makes unconditionally -----------------------------

class _InertStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _InertEvent()


class _InertEvent(_InertStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(name: str):
    # A distinct function per patched name: dynamo's trace rules index torch objects and
    # reject one object registered under two names.
    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _patch_cuda_namespace() -> None:
    cuda = torch.cuda
    for name in ("current_device", "synchronize", "set_device", "current_stream", "Stream",
                 "Event", "stream", "get_rng_state", "manual_seed"):
        _require(cuda, name)
    # The CPU device itself, not an index: megatron's TP layers allocate with
    # device=current_device() inside autograd backward, where no torch function mode is active
    # (a mode is popped while its handler, here the backward call, runs).
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = _noop("synchronize")
    cuda.set_device = _noop("set_device")
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = _noop("range_push")
    cuda.nvtx.range_pop = _noop("range_pop")
    # The "device" generator megatron seeds and forks is the CPU generator here.
    cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    cuda.manual_seed = lambda seed, *args, **kwargs: torch.manual_seed(seed)


# --- 3: RNG tracker --------------------------------------------------------------------------

def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _require(mrandom, "_get_cuda_rng_state")
    _require_params(_require(mrandom, "_set_cuda_rng_state"), "new_state")

    # The device, clone and CUDA-graph arguments have no meaning for the one CPU generator
    # (its state is returned as a fresh tensor): accept whatever megatron passes.
    def get_state(*args, **kwargs):
        return torch.get_rng_state()

    def set_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


# --- 5: sequence parallelism with torch norms ---------------------------------------------

def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    wrapped = _require(torch_norm, "WrappedTorchNorm")
    original_new = wrapped.__new__
    signature = _require_params(original_new, "config")

    def new(cls, *args, **kwargs):
        config = signature.bind(cls, *args, **kwargs).arguments["config"]
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False  # only to get past the wrapper's refusal
        try:
            norm = original_new(cls, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for p in norm.parameters():
            # finalize_model_grads all-reduces grads of params marked like this across TP.
            p.sequence_parallel = sequence_parallel
        return norm

    wrapped.__new__ = staticmethod(new)


# --- 6: MoE all-to-all split sizes ---------------------------------------------------------

def _patch_moe_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = _require(moe_utils, "maybe_move_tensor_to_cpu")
    _require(token_dispatcher, "maybe_move_tensor_to_cpu")  # imported by name there
    signature = _require_params(original, "tensor", "as_numpy")

    def move(*args, **kwargs):
        out = original(*args, **kwargs)
        as_numpy = signature.bind(*args, **kwargs).arguments.get("as_numpy", False)
        return out.numpy() if as_numpy and torch.is_tensor(out) else out

    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move


# --- 7: uneven first-dimension gathers / reduce-scatters over gloo ---------------------------

def _patch_uneven_first_dim_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather = _require(mappings, "_gather_along_first_dim")
    reduce_scatter = _require(mappings, "_reduce_scatter_along_first_dim")
    gather_sig = _require_params(gather, "input_", "group", "output_split_sizes")
    scatter_sig = _require_params(reduce_scatter, "input_", "group", "input_split_sizes")

    def uneven_gather(*args, **kwargs):
        a = gather_sig.bind(*args, **kwargs).arguments
        sizes, group, x = a.get("output_split_sizes"), a["group"], a["input_"]
        if sizes is None or group.size() == 1:
            return gather(*args, **kwargs)
        sizes = [int(n) for n in sizes]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    def uneven_reduce_scatter(*args, **kwargs):
        a = scatter_sig.bind(*args, **kwargs).arguments
        sizes, group, x = a.get("input_split_sizes"), a["group"], a["input_"]
        if sizes is None or group.size() == 1:
            return reduce_scatter(*args, **kwargs)
        total = x.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(n) for n in sizes]
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = uneven_gather
    mappings._reduce_scatter_along_first_dim = uneven_reduce_scatter


def _require_params(fn, *names: str) -> inspect.Signature:
    """``fn``'s signature, checked to still have the parameters a patch relies on."""
    signature = inspect.signature(fn)
    missing = [n for n in names if n not in signature.parameters]
    if missing:
        raise CpuLayerError(
            f"{fn.__module__}.{fn.__qualname__} no longer takes {', '.join(missing)}: this "
            "megatron-core release changed a function the CPU layer adapts; pin "
            "megatron-core==0.16.1")
    return signature


# --- 4: hard-coded CUDA device requests --------------------------------------------------

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA placement requests into CPU ones; everything else passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype) or func(*args)
        if kwargs:
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)
