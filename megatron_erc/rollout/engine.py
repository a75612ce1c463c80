"""The rollout-engine protocol shared by the vLLM and the embedded (HF transformers) engines.

Log-prob convention (both engines agree on it): ``Sample.logprobs[t]`` is the log-probability of
the sampled token under the distribution it was actually drawn from, computed in fp32:
``log_softmax(filter_top_p(logits / temperature))``. With ``top_p == 1`` (the RL default) this is
``log_softmax(logits / temperature)``, the same quantity the trainer recomputes; with
``temperature == 0`` (greedy) it is ``log_softmax(logits)`` of the raw logits. vLLM returns the
*raw* (T=1) log-probs by default; the vLLM engine asks for ``logprobs_mode="processed_logprobs"``,
which is exactly the convention above.

Weight updates happen in one *update session*: ``begin_update()``, then ``update_weights(bucket)``
any number of times, then ``finish_update()``. Every bucket is checked against the engine's
current weights (known name, same shape, not sent twice) before anything reaches the engine, and
``finish_update()`` refuses to commit unless every weight arrived: a partial update of vLLM
"succeeds" with warnings and leaves wrong outputs, and a failed reload kills the engine, so the
engine only ever sees complete, validated weight sets. ``update_weights`` outside a session is a
one-shot session (it must carry the full set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]
NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(kw_only=True)
class SamplingConfig:
    """How to sample responses; one config applies to every prompt of a ``generate`` call."""

    n: int = 1
    """Samples per prompt (GRPO's group size)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (then ``n`` samples are identical)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables the filter. Returned log-probs are of the filtered,
    renormalised distribution, so keep 1.0 when the trainer recomputes plain log-softmax."""
    max_tokens: int = 64
    """Upper bound on response tokens; a response cut here finishes with "length"."""
    seed: int | None = None
    """Seed for reproducible sampling; None draws fresh randomness each call."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (finish "stop"); the stop token is kept as the last response
    token, so the trainer sees (and learns) it. Pass the tokenizer's EOS here: engines do not add
    the model's EOS on their own."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1 (samples per prompt); got {self.n}.")
        if self.temperature < 0:
            raise ValueError(
                f"SamplingConfig.temperature must be >= 0 (0 = greedy); got {self.temperature}."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingConfig.top_p must be in (0, 1]; got {self.top_p}. Use 1.0 to disable."
            )
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1; got {self.max_tokens}.")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative; got {self.stop_token_ids}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    """One response to one prompt."""

    token_ids: list[int]
    """Response token ids ``[T]`` (prompt excluded; a stop token, if hit, is the last one)."""
    logprobs: list[float]
    """fp32 log-prob of each response token ``[T]`` (see the module docstring for which
    distribution)."""
    finish_reason: FinishReason
    """"stop" when a stop token ended it, "length" when ``max_tokens`` did."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an inference engine."""

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
        seeds: list[int] | None = None,
    ) -> list[list[Sample]]:
        """``sampling.n`` samples for each prompt, in prompt order: ``[num_prompts][n]``.
        ``seeds[i]`` (optional) seeds prompt ``i``'s samples on their own, so they do not depend
        on which engine or batch draws them (where the engine supports per-request seeds)."""
        ...

    def begin_update(self) -> None: ...

    def update_weights(self, named_tensors: NamedTensors) -> None:
        """Stage ``(hf_name, tensor)`` pairs (inside a session) or replace all weights (outside)."""
        ...

    def finish_update(self) -> None: ...

    def abort_update(self) -> None: ...

    def sleep(self) -> None:
        """Release device memory (weights offloaded, KV cache freed) until ``wake_up``."""
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back ``tags`` (``"weights"``, ``"kv_cache"``; None: everything)."""
        ...

    def close(self) -> None: ...


@dataclass
class WeightUpdateSession:
    """Checks a stream of ``(name, tensor)`` against the engine's weights before they are sent.

    ``expected`` maps each HF parameter name the engine holds to its shape. Raises ``ValueError``
    (and the engine must not have been touched) on an unknown name, a shape mismatch, a repeat,
    or, in ``check_complete``, a missing weight.
    """

    expected: Mapping[str, tuple[int, ...]]
    seen: set[str] = field(default_factory=set)
    bytes: int = 0

    def check(self, name: str, tensor: torch.Tensor) -> None:
        shape = self.expected.get(name)
        if shape is None:
            near = sorted(self.expected)[:5]
            raise ValueError(
                f"weight update: unknown parameter {name!r}; the engine's model has "
                f"{len(self.expected)} parameters named like {near}. Convert names to the HF "
                "checkpoint layout before syncing (tied lm_head weights must be dropped)."
            )
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"weight update: {name!r} has shape {tuple(tensor.shape)}, the engine's model "
                f"expects {tuple(shape)}."
            )
        if name in self.seen:
            raise ValueError(f"weight update: {name!r} was sent twice in one update session.")
        self.seen.add(name)
        self.bytes += tensor.numel() * tensor.element_size()

    def check_complete(self) -> None:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise ValueError(
                f"weight update: partial update rejected, {len(missing)} of {len(self.expected)} "
                f"parameters were not sent (e.g. {missing[:5]}). Send the full set of weights: "
                "vLLM silently keeps stale or corrupted weights after a partial reload."
            )


class StagedWeightUpdates:
    """``begin_update`` / ``update_weights`` / ``finish_update`` / ``abort_update`` for
    engines that stage checked buckets and apply them all at once.

    An engine supplies ``_expected_shapes()`` (HF name -> shape), ``_stage(bucket)`` (keep a
    checked ``{name: cpu tensor}`` bucket, not applied yet; the tensors may be views of the
    caller's buffers, so an engine that holds them past the call copies them),
    ``_commit()`` (apply everything staged) and ``_discard()`` (drop it). ``update_weights``
    outside a session is a one-shot session of its own. Nothing is applied unless the whole
    set arrived.
    """

    _session: WeightUpdateSession | None = None

    def begin_update(self) -> None:
        if self._session is not None:
            raise RuntimeError("begin_update: an update session is already open.")
        self._discard()
        self._session = WeightUpdateSession(expected=self._expected_shapes())

    def update_weights(self, named_tensors: NamedTensors) -> None:
        if self._session is None:
            self.begin_update()
            try:
                self.update_weights(named_tensors)
                self.finish_update()
            except BaseException:
                self.abort_update()
                raise
            return
        bucket = {}
        for name, tensor in named_tensors:
            self._session.check(name, tensor)
            bucket[name] = tensor.detach().to("cpu").contiguous()
        if bucket:
            self._stage(bucket)

    def finish_update(self) -> None:
        if self._session is None:
            raise RuntimeError("finish_update: no update session is open (call begin_update).")
        try:
            self._session.check_complete()
        except ValueError:
            self.abort_update()
            raise
        self._session = None
        self._commit()

    def abort_update(self) -> None:
        self._session = None
        self._discard()

    def _expected_shapes(self) -> Mapping[str, tuple[int, ...]]:
        raise NotImplementedError

    def _stage(self, bucket: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError
