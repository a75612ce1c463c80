"""Bring every pipeline stage's weights to every rank, one tensor at a time.

Every rank hosts (or drives) a rollout engine, and an engine needs the whole model, while a
pipeline stage holds only its own layers (``hf_adapter.iter_hf_weights``). ``all_stage_weights``
walks the stages in order; the owner stage broadcasts each ``(name, tensor)`` pair over the
pipeline group as it produces it, so every rank sees the whole model in stage order and no
rank holds more than one extra tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def all_stage_weights(stage_weights: Iterable[tuple[str, torch.Tensor]],
                      pp_group) -> Iterator[tuple[str, torch.Tensor]]:
    """All stages' pairs (stage 0's first, then stage 1, 2, ...) on every rank of
    ``pp_group``.

    ``stage_weights``: this stage's ``(hf_name, tensor)`` pairs. Every rank of ``pp_group``
    must exhaust the iterator. Communication: broadcasts over ``pp_group`` only (a pickled
    ``(name, shape, dtype)`` header, then the tensor; ``None`` ends a stage).
    """
    rank, size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    if size == 1:
        yield from stage_weights
        return
    device = torch.device("cpu")
    if dist.get_backend(pp_group) == "nccl":  # NCCL moves device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    for stage in range(size):
        src = dist.get_global_rank(pp_group, stage)
        if stage == rank:
            for name, tensor in stage_weights:
                tensor = tensor.detach().to(device).contiguous()
                dist.broadcast_object_list([(name, tuple(tensor.shape), tensor.dtype)],
                                           src=src, group=pp_group)
                dist.broadcast(tensor, src=src, group=pp_group)
                yield name, tensor
            dist.broadcast_object_list([None], src=src, group=pp_group)
            continue
        while True:
            header = [None]
            dist.broadcast_object_list(header, src=src, group=pp_group)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, src=src, group=pp_group)
            yield name, tensor
