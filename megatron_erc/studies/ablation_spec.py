"""What the ERC ablation compares and where its files are: shared by the runner
(``ablation.py``) and the report (``ablation_report.py``), which import this module and
not each other (the report only reads finished runs)."""

from __future__ import annotations

import pathlib

from megatron_erc.cli.assets import checkout_root, example_path

REPO = checkout_root() or pathlib.Path.cwd()  # git commit, docs/ and the runs' working dir
CONFIG = example_path("ablation/offpolicy.yaml")
SFT_CONFIG = example_path("tiny/sft.yaml")
MODULE = "megatron_erc.studies.ablation"
"""The runner, as ``python -m`` runs it (also for each RL run's own process)."""

# The miniature (examples/ablation/miniature.md has the measurements behind these choices):
# single-digit + and - only (155 distinct problems, answers 0..18), bare prompts ("3 + 4 = ",
# <= 7 tokens instead of 38 for the demo's "Q: What is 3 + 4? Put the final answer in
# \\boxed{}.\nA: ": the update's cost is mostly the sequence length), answer-only targets
# (``\\boxed{7}``: responses of ~7 tokens instead of ~25, so a rollout is cheap), 256
# validation prompts x 2 samples (a binomial std of ~2 points at 35%), and an SFT warm start
# long enough that the policy is right about a third of the time at temperature 1 (150 steps
# of the long-target demo task left it at ~17%, and a 60-step warm start of this task at 8%:
# DAPO learned from neither).
TASK = {"ops": ("+", "-"), "difficulty": 1, "n_train": 4000, "n_val": 256,
        "prompt": "{a} {op} {b} = ", "vocab_size": 320}
SFT_STEPS = 200
SFT_OVERRIDES = ["run.seq_len=24", "data.max_prompt_tokens=12"]  # prompt <= 7 tokens + answer
TASK_DESCRIPTION = ("generated single-digit + and - problems (`megatron_erc.data.arithmetic`, "
                    "155 distinct) as bare `3 + 4 = ` prompts with answer-only `\\boxed{}` "
                    "targets, "
                    f"{TASK['n_train']} training / {TASK['n_val']} validation prompts drawn with "
                    "different seeds from the same 155 problems, so validation measures "
                    "problems RL also trains on (`megatron_erc.studies.ablation.prepare_task`)")

_CLIP = ["algo.surrogate=clip", "algo.eps_low=0.2", "algo.eps_high=0.28", "algo.dual_clip=10"]
_GPPO = ["algo.surrogate=gppo", "algo.eps_low=0.2", "algo.eps_high=0.2", "algo.dual_clip=10"]
_ERC = ["algo.erc={low: 0.95, high: 1.05}"]
VARIANTS = {  # name -> algo overrides; ERC is the only difference within a pair
    "dapo": _CLIP + ["algo.erc=null"],
    "dapo_erc": _CLIP + _ERC,
    "gppo": _GPPO + ["algo.erc=null"],
    "gppo_erc": _GPPO + _ERC,
}
LABELS = {"dapo": "DAPO", "dapo_erc": "DAPO+ERC", "gppo": "GPPO", "gppo_erc": "GPPO+ERC"}


def rel(path: pathlib.Path) -> str:
    """``path`` relative to the checkout (or working directory) when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
