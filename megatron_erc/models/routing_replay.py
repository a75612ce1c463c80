"""Routing replay: the update forwards of a batch route tokens to the experts its scoring
forward chose.

MoE RL is unstable without it: a router's top-k flips between the forward that produced the
old log-probs and the training forwards (near ties, changed weights after the first update,
different numerics), so the importance ratio and ERC's entropy ratio compare two different
networks. With replay, each router of an update forward takes the experts recorded for the
same tokens and layer in the scoring forward; the gate weights are still computed from the
current router logits at those experts (megatron's ``RouterReplay`` semantics), so the
router keeps its gradient.

Mechanism: every ``TopKRouter`` of the chunks gets a replay object in megatron's own hook
(``router.router_replay``, called by ``topk_routing_with_score_function``), and a forward
pre-hook on each chunk keys the micro-batch by a hash of its input ids. Keys are token
contents, so a micro-batch is found again whatever order or split the update uses, on every
TP/SP/EP/PP rank (each rank records what its own routers saw). A token block never recorded
is routed normally and counted in ``misses``.

Not supported: full activation recompute with pipeline parallelism (a recomputed layer
runs in backward while another micro-batch's forward has set the key), refused at
construction.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

MODES = ("none", "old")


class _RouterHook:
    """One router's ``router_replay`` stand-in (``get_replay_topk`` as megatron calls it)."""

    def __init__(self, owner: RoutingReplay, layer: int):
        self.owner, self.layer = owner, layer

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        owner, key = self.owner, (self.owner.current, self.layer)
        if owner.mode == "record":
            values, indices = default_compute_topk(scores, topk, num_groups, group_topk)
            owner.store[key] = indices.detach().to(torch.int32)
            return values, indices
        if owner.mode == "replay":
            recorded = owner.store.get(key)
            if recorded is not None and recorded.shape == (scores.shape[0], topk):
                indices = recorded.to(device=scores.device, dtype=torch.long)
                return scores.gather(1, indices), indices
            owner.misses += 1
        return default_compute_topk(scores, topk, num_groups, group_topk)


class RoutingReplay:
    """Record the experts of a scoring forward, replay them in update forwards.

    ``chunks``: this rank's model chunks (DDP/Float16 wrappers are unwrapped). Use
    ``with replay.recording():`` around the forward that computes the old log-probs (it
    forgets earlier records), then ``with replay.replaying():`` around each update
    forward-backward of the same batch; outside both, routing is megatron's own.
    """

    def __init__(self, chunks, *, recompute: str = "none", pp: int = 1):
        from megatron.core.transformer.moe.router import TopKRouter

        if recompute == "full" and pp > 1:
            raise ValueError("routing replay with recompute=full and pp > 1 is not supported "
                             "(a recomputed layer runs while another micro-batch is in "
                             "flight); use recompute=selective or none, or pp=1")
        self.mode: str | None = None
        self.current: bytes | None = None
        self.store: dict[tuple[bytes | None, int], torch.Tensor] = {}
        self.misses = 0
        self._handles = []
        self._routers = []
        for chunk in chunks:
            while hasattr(chunk, "module"):
                chunk = chunk.module
            self._handles.append(chunk.register_forward_pre_hook(self._set_key,
                                                                 with_kwargs=True))
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    m.router_replay = _RouterHook(self, m.layer_number)
                    self._routers.append(m)

    def _set_key(self, module, args, kwargs):
        tokens = args[0] if args else kwargs.get("input_ids")
        data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        self.current = hashlib.blake2b(data + str(tuple(tokens.shape)).encode(),
                                       digest_size=16).digest()

    @contextlib.contextmanager
    def recording(self):
        self.store.clear()
        with self._mode("record"):
            yield self

    @contextlib.contextmanager
    def replaying(self):
        with self._mode("replay"):
            yield self

    @contextlib.contextmanager
    def _mode(self, mode: str):
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def clear(self) -> None:
        self.store.clear()
        self.misses = 0

    def remove(self) -> None:
        """Undo the hooks: routing is megatron's own again."""
        for h in self._handles:
            h.remove()
        for router in self._routers:
            router.router_replay = None
        self._handles.clear()
        self._routers.clear()

    @property
    def routers(self) -> int:
        """How many routers of this rank are hooked."""
        return len(self._routers)
