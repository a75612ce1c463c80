"""The rollout-engine protocol shared by the vLLM and the embedded (HF transformers) engines.

Log-prob convention (both engines agree on it): ``Sample.logprobs[t]`` is the log-probability of
the sampled token under the distribution it was actually drawn from, computed in fp32:
``log_softmax(filter_top_p(logits / temperature))``. With ``top_p == 1`` (the RL default) this is
``log_softmax(logits / temperature)``, the same quantity the trainer recomputes; with
``temperature == 0`` (greedy) it is ``log_softmax(logits)`` of the raw logits. vLLM returns the
*raw* (T=1) log-probs by default; the vLLM engine asks for ``logprobs_mode="processed_logprobs"``,
which is exactly the convention above.

Weight updates stream (``load_weights``): the sender first declares a *manifest* (every HF
name it will send, with its shape); the engine refuses it, untouched, unless it names exactly
the engine's weights with their shapes (a partial update of vLLM "succeeds" with warnings and
leaves wrong outputs). Then the tensors stream in and each is checked against the manifest
and loaded as it arrives: no engine stages a whole model. A stream that breaks after loading
started (the sender failed, a tensor went missing) leaves the engine *partial*: it refuses to
generate until a complete update succeeds. ``update_weights(pairs)`` is a one-shot stream
whose manifest is the pairs themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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

    def load_weights(self, named_tensors: NamedTensors,
                     manifest: Mapping[str, tuple[int, ...]], bucket_bytes: int) -> None:
        """Stream ``(hf_name, tensor)`` pairs declared by ``manifest`` into the engine (see the
        module docstring); ``bucket_bytes`` bounds what an out-of-process engine has in flight."""
        ...

    def update_weights(self, named_tensors: NamedTensors) -> None:
        """Replace all weights with the given ``(hf_name, tensor)`` pairs (the full set)."""
        ...

    def sleep(self) -> None:
        """Release device memory (weights offloaded, KV cache freed) until ``wake_up``."""
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back ``tags`` (``"weights"``, ``"kv_cache"``; None: everything)."""
        ...

    def close(self) -> None: ...


@dataclass
class WeightUpdateSession:
    """Checks a declared manifest, then the stream of ``(name, tensor)`` it announced, against
    the engine's weights.

    ``expected`` maps each HF parameter name the engine holds to its shape. Raises ``ValueError``
    on an unknown name, a shape mismatch, a repeat, or a missing weight.
    """

    expected: Mapping[str, tuple[int, ...]]
    seen: set[str] = field(default_factory=set)
    bytes: int = 0

    def check_manifest(self, manifest: Mapping[str, tuple[int, ...]]) -> None:
        """Before anything is loaded: ``manifest`` must be exactly the engine's weights."""
        for name, shape in manifest.items():
            self._check_name_shape(name, shape)
        missing = sorted(set(self.expected) - set(manifest))
        if missing:
            raise ValueError(
                f"weight update: partial update rejected, {len(missing)} of {len(self.expected)} "
                f"parameters are not in the update (e.g. {missing[:5]}). Send the full set of "
                "weights: vLLM silently keeps stale or corrupted weights after a partial reload."
            )

    def _check_name_shape(self, name: str, shape) -> None:
        want = self.expected.get(name)
        if want is None:
            near = sorted(self.expected)[:5]
            raise ValueError(
                f"weight update: unknown parameter {name!r}; the engine's model has "
                f"{len(self.expected)} parameters named like {near}. Convert names to the HF "
                "checkpoint layout before syncing (tied lm_head weights must be dropped)."
            )
        if tuple(shape) != tuple(want):
            raise ValueError(
                f"weight update: {name!r} has shape {tuple(shape)}, the engine's model "
                f"expects {tuple(want)}."
            )

    def check(self, name: str, tensor: torch.Tensor) -> None:
        self._check_name_shape(name, tensor.shape)
        if name in self.seen:
            raise ValueError(f"weight update: {name!r} was sent twice in one update.")
        self.seen.add(name)
        self.bytes += tensor.numel() * tensor.element_size()

    def checked(self, named_tensors: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
        """``named_tensors``, each checked as it passes; at the end, every weight must have
        come."""
        for name, tensor in named_tensors:
            self.check(name, tensor)
            yield name, tensor
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise ValueError(
                f"weight update: the stream ended without {len(missing)} of the "
                f"{len(self.expected)} announced parameters (e.g. {missing[:5]})."
            )


class StreamedWeightLoads:
    """``load_weights`` / ``update_weights`` for engines that load checked tensors as they
    arrive. An engine supplies ``_expected_shapes()`` (HF name -> shape) and
    ``_load_stream(pairs, bucket_bytes)`` (consume the checked pairs, loading each; the
    tensors may be views of the caller's buffers or live trainer parameters, valid only until
    the next one is drawn), and calls ``_require_complete()`` before generating.
    """

    _partial: str | None = None

    def load_weights(self, named_tensors: NamedTensors,
                     manifest: Mapping[str, tuple[int, ...]], bucket_bytes: int = 256 << 20,
                     ) -> int:
        """Returns the bytes loaded. Raises ``ValueError`` (engine untouched) on a bad manifest;
        on a stream that breaks after loading began, the engine stays partial and it raises."""
        session = WeightUpdateSession(expected=self._expected_shapes())
        session.check_manifest(manifest)
        self._partial = "a weight update was interrupted after it had started loading"
        self._load_stream(session.checked(named_tensors), bucket_bytes)
        self._partial = None
        return session.bytes

    def update_weights(self, named_tensors: NamedTensors) -> None:
        pairs = list(named_tensors)
        seen: set[str] = set()
        for name, _ in pairs:  # the manifest below is a dict: a repeat would vanish in it
            if name in seen:
                raise ValueError(f"weight update: {name!r} was sent twice in one update.")
            seen.add(name)
        self.load_weights(pairs, {n: tuple(t.shape) for n, t in pairs})

    def _require_complete(self) -> None:
        if self._partial is not None:
            raise RuntimeError(
                f"the rollout engine holds a partial weight set ({self._partial}); run a "
                "complete weight update (or restart the engine) before generating")

    def _expected_shapes(self) -> Mapping[str, tuple[int, ...]]:
        raise NotImplementedError

    def _load_stream(self, pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        raise NotImplementedError
