"""The embedded default job: a tiny model learns boxed arithmetic on a CPU in minutes.

Builds a tokenizer and a tiny Qwen2-layout megatron model from scratch (no downloads),
trains it with supervised warm-start steps through the full megatron stack (DDP, optimizer,
pipeline schedule, vocab-parallel log-probs), and grades greedy answers on held-out
problems with the math-verify grader before and after.
"""

from __future__ import annotations

import json
import pathlib
import random
import time

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def tiny_hf_config(vocab_size: int):
    from transformers import AutoConfig

    d = json.loads((EXAMPLES / "tiny" / "config.json").read_text())
    d.pop("architectures", None), d.pop("torch_dtype", None)
    d["vocab_size"] = vocab_size
    return AutoConfig.for_model(d.pop("model_type"), **d)


def evaluate(actor, tokenizer, grader, problems, prompt_of) -> float:
    from megatron_erc.trainer.greedy import greedy_generate

    outs = greedy_generate(actor.model[0], tokenizer, [prompt_of(p) for p in problems],
                           max_new_tokens=40, vocab_size=actor.vocab_size)
    result = grader.grade(outs, [p.answer for p in problems])
    return sum(result.rewards) / len(problems), outs


def run_demo(out_dir: str = "runs/demo", steps: int = 150, batch_size: int = 32,
             micro_batch_size: int = 16, seed: int = 0, lr: float = 2e-3) -> dict:
    import torch

    from megatron_erc import platform
    from megatron_erc.data.arithmetic import generate_problems
    from megatron_erc.data.tokenizers import train_sentencepiece
    from megatron_erc.models import ParallelConfig
    from megatron_erc.platform.distributed import init_process_group
    from megatron_erc.rewards import MathGrader
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.sft import pack_sft_batch, sft_step

    t0 = time.time()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    init_process_group(platform.setup())
    platform.init_model_parallel(1, 1, seed=seed)

    train = generate_problems(4000, seed=seed, difficulty=1)
    held_out = generate_problems(64, seed=seed + 10_000, difficulty=1)
    prompt_of = lambda p: f"Q: {p.prompt}\nA: "  # noqa: E731
    tokenizer = train_sentencepiece([prompt_of(p) + p.sft_target for p in train[:2000]],
                                    out / "tokenizer.model", vocab_size=320)
    actor = Actor(tiny_hf_config(tokenizer.vocab_size), ParallelConfig(pad_vocab_multiple=8),
                  OptimConfig(lr=lr, weight_decay=0.0, clip_grad=1.0))
    rng = random.Random(seed)
    seq_len = 96
    log = []
    with MathGrader(timeout_s=5.0, num_workers=1) as grader, \
            open(out / "metrics.jsonl", "w") as metrics_file:
        acc0, _ = evaluate(actor, tokenizer, grader, held_out, prompt_of)
        print(f"[demo] before training: held-out accuracy {acc0:.1%}", flush=True)
        for step in range(1, steps + 1):
            batch = rng.sample(train, batch_size)
            packed = pack_sft_batch(tokenizer, [prompt_of(p) for p in batch],
                                    [p.sft_target for p in batch], seq_len)
            micro = [{k: v[i: i + micro_batch_size] for k, v in packed.items()}
                     for i in range(0, batch_size, micro_batch_size)]
            m = sft_step(actor, micro)
            m["step"] = step
            metrics_file.write(json.dumps(m) + "\n")
            log.append(m)
            if step % 25 == 0 or step == 1:
                print(f"[demo] step {step:4d}  loss {m['sft/loss']:.3f}  "
                      f"grad_norm {m['grad_norm']:.2f}", flush=True)
        acc1, outs = evaluate(actor, tokenizer, grader, held_out, prompt_of)
    print(f"[demo] example: {prompt_of(held_out[0])!r} -> {outs[0]!r}")
    summary = {"accuracy_before": acc0, "accuracy_after": acc1,
               "loss_first": log[0]["sft/loss"], "loss_last": log[-1]["sft/loss"],
               "seconds": round(time.time() - t0, 1), "run_dir": str(out.resolve())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] held-out accuracy {acc0:.1%} -> {acc1:.1%}; loss {summary['loss_first']:.3f}"
          f" -> {summary['loss_last']:.3f}; {summary['seconds']} s; run dir {out.resolve()}")
    return summary
