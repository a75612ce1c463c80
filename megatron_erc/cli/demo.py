"""The embedded default job: from nothing to DAPO+ERC on a CPU in minutes.

1. Prepare (no downloads): a generated arithmetic task with boxed answers, a SentencePiece
   tokenizer trained on it, a randomly initialised tiny Qwen2-layout model
   (``examples/tiny/config.json``).
2. Supervised warm start (``examples/tiny/sft.yaml``) so RL starts from a policy that is
   sometimes right.
3. DAPO + ERC (``examples/tiny/dapo_erc.yaml``) with the vLLM CPU engine where installed,
   the embedded engine otherwise; validation accuracy before and after; a PNG dashboard.
"""

from __future__ import annotations

import json
import pathlib
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from megatron_erc.cli.assets import example_path
from megatron_erc.config import load_config
from megatron_erc.data.arithmetic import generate_problems
from megatron_erc.data.tokenizers import train_sentencepiece
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.loggers import check_loggers
from megatron_erc.trainer.run import run_train
from megatron_erc.trainer.sft import SFTConfig, run_sft

PROMPT = "Q: {q}\nA: "


def prepare(root: pathlib.Path, seed: int = 0) -> None:
    """Task files, tokenizer and a random-init HF model directory under ``root``."""

    train = generate_problems(4000, seed=seed, difficulty=1)
    val = generate_problems(128, seed=seed + 10_000, difficulty=1)
    write_task(root, train, val, prompt=lambda p: PROMPT.format(q=p.prompt),
               target=lambda p: p.sft_target, vocab_size=320, seed=seed)


def write_task(root: pathlib.Path, train: list, val: list, *, prompt, target,
               vocab_size: int, seed: int) -> None:
    """``root/data/{train,val}.jsonl`` (``prompt(p)``, answer, ``target(p)`` of each problem),
    a SentencePiece tokenizer of ``vocab_size`` trained on the training prompts with their
    worked solutions, and ``root/init``: the tiny model (``examples/tiny/config.json``) with
    that vocabulary, randomly initialised from ``seed``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", train), ("val", val)):
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps({"prompt": prompt(p), "answer": p.answer,
                                    "target": target(p)}) + "\n")
    tok = train_sentencepiece([prompt(p) + p.sft_target for p in train[:2000]],
                              root / "tokenizer.model", vocab_size=vocab_size)
    d = json.loads(example_path("tiny/config.json").read_text())
    d.pop("architectures", None), d.pop("torch_dtype", None)
    d.update(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
             pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    hf_logging.disable_progress_bar()  # a one-shard bar says nothing for a 3 MB model
    try:
        model.save_pretrained(root / "init")
    finally:
        hf_logging.enable_progress_bar()


def run_demo(out_dir: str = "runs/demo", sft_steps: int = 150, rl_steps: int = 60,
             seed: int = 0, loggers: list[str] | None = None) -> dict:
    """``loggers``: the RL run's ``run.loggers`` (None: the config's, jsonl + TensorBoard)."""

    t0 = time.time()
    check_loggers(loggers or [])  # a missing package stops the demo now, not after SFT
    root = pathlib.Path(out_dir)
    paths = [f"run.seed={seed}", f"model.tokenizer={root / 'tokenizer.model'}",
             f"data.path={root / 'data' / 'train.jsonl'}"]
    print(f"[demo] preparing task, tokenizer and tiny model in {root}", flush=True)
    prepare(root, seed)
    sft_cfg = load_config(SFTConfig, example_path("tiny/sft.yaml"), paths + [
        f"run.dir={root / 'sft'}", f"run.steps={sft_steps}", f"model.path={root / 'init'}"])
    hf_dir, sft_loss = run_sft(sft_cfg)
    print(f"[demo] warm start done: SFT loss {sft_loss:.3f}; model in {hf_dir}", flush=True)
    rl_cfg = load_config(TrainConfig, example_path("tiny/dapo_erc.yaml"), paths + [
        f"run.dir={root / 'rl'}", f"run.steps={rl_steps}", f"model.path={hf_dir}",
        f"validation.path={root / 'data' / 'val.jsonl'}",
        *([f"run.loggers=[{','.join(loggers)}]"] if loggers else [])])
    history = run_train(rl_cfg, validate_first=True, dashboard=True)  # ends with a summary
    acc = [m["val/accuracy"] for m in history if "val/accuracy" in m]
    rl = json.loads((root / "rl" / "summary.json").read_text())
    summary = {"warm_start_accuracy": acc[0], "final_accuracy": acc[-1],
               "seconds": round(time.time() - t0, 1), "run_dir": str((root / "rl").resolve()),
               "dashboard": rl["paths"].get("dashboard")}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['seconds']:.0f} s (task, warm start, RL); compare runs "
          f"with: megatron-erc plot {summary['run_dir']} OTHER_RUN_DIR")
    return summary
