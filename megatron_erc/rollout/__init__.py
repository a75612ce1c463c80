"""Rollout engines behind one protocol (generate, update_weights, sleep/wake) and weight sync.

``VLLMEngine`` imports vLLM only when constructed, so this package imports without vLLM.
"""

from .embedded import EmbeddedEngine
from .engine import RolloutEngine, Sample, SamplingConfig, WeightUpdateSession
from .vllm_engine import VLLMEngine, vllm_available
from .weight_sync import (
    SyncStats,
    broadcast_weights,
    receive_broadcast,
    stream_in_buckets,
    sync_weights,
)

__all__ = [
    "EmbeddedEngine",
    "RolloutEngine",
    "Sample",
    "SamplingConfig",
    "SyncStats",
    "VLLMEngine",
    "WeightUpdateSession",
    "broadcast_weights",
    "receive_broadcast",
    "stream_in_buckets",
    "sync_weights",
    "vllm_available",
]
