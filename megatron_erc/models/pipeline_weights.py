"""Bring every pipeline stage's weights to the first stage, one tensor at a time.

The rollout engine lives on the first pipeline stage; each stage streams only its own layers
(``hf_adapter.iter_hf_weights``). ``stream_pipeline_weights`` forwards the later stages'
``(name, tensor)`` pairs to the first stage point to point over the pipeline group, so the
engine sees the whole model in stage order without any rank holding more than one extra
tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def stream_pipeline_weights(stage_weights: Iterable[tuple[str, torch.Tensor]],
                            pp_group) -> Iterator[tuple[str, torch.Tensor]]:
    """All stages' pairs on the group's rank 0 (its own first, then stage 1, 2, ...); on the
    other ranks, sends this stage's pairs to rank 0 and yields nothing.

    ``stage_weights``: this stage's ``(hf_name, tensor)`` pairs. Every rank of ``pp_group``
    must exhaust the iterator. Communication: point-to-point over ``pp_group`` only (a
    pickled ``(name, shape, dtype)`` header, then the tensor; ``None`` ends a stage).
    """
    rank, size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    if size == 1:
        yield from stage_weights
        return
    first = dist.get_global_rank(pp_group, 0)
    device = torch.device("cpu")
    if dist.get_backend(pp_group) == "nccl":  # NCCL moves device tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    if rank != 0:
        for name, tensor in stage_weights:
            tensor = tensor.detach().to(device).contiguous()
            dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=first,
                                  group=pp_group)
            dist.send(tensor, dst=first, group=pp_group)
        dist.send_object_list([None], dst=first, group=pp_group)
        return
    yield from stage_weights
    for stage in range(1, size):
        src = dist.get_global_rank(pp_group, stage)
        while True:
            header = [None]
            dist.recv_object_list(header, src=src, group=pp_group)
            if header[0] is None:
                break
            name, shape, dtype = header[0]
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(tensor, src=src, group=pp_group)
            yield name, tensor
