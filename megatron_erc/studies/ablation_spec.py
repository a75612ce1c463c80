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

# The variants (issue 17 part 3): only `algo.*` differs. Hyper-parameters are the papers' (and
# verl's) defaults where `algorithms/config.py` has them: DAPO clip-higher 0.2 / 0.28, the ERC
# runs' GPPO eps 0.2 and dual clip 10, Clip-Cov frac 2e-4 in the covariance band [1, 5], KL-Cov
# frac 2e-3 with coefficient 1; CISPO keeps DAPO's eps so that only the surrogate differs
# (MiniMax-M1 lifts the lower bound); DPPO's bounds 0.2 are our default, not the paper's.
_CLIP = ["algo.surrogate=clip", "algo.eps_low=0.2", "algo.eps_high=0.28", "algo.dual_clip=10"]
_GPPO = ["algo.surrogate=gppo", "algo.eps_low=0.2", "algo.eps_high=0.2", "algo.dual_clip=10"]
_OFF = ["algo.erc=null", "algo.regularizer=none"]


def _erc(low: float, high: float) -> list[str]:
    return [f"algo.erc={{low: {low}, high: {high}}}", "algo.regularizer=none"]


VARIANTS = {  # name -> algo overrides
    "dapo": _CLIP + _OFF,
    "dapo_erc_080": _CLIP + _erc(0.8, 1.2),
    "dapo_erc_090": _CLIP + _erc(0.9, 1.1),
    "dapo_erc_095": _CLIP + _erc(0.95, 1.05),
    "gppo": _GPPO + _OFF,
    "gppo_erc": _GPPO + _erc(0.95, 1.05),
    "dapo_clip_cov": _CLIP + ["algo.erc=null", "algo.regularizer=clip_cov",
                              "algo.clip_cov_frac=0.0002", "algo.clip_cov_low=1.0",
                              "algo.clip_cov_high=5.0"],
    "dapo_kl_cov": _CLIP + ["algo.erc=null", "algo.regularizer=kl_cov",
                            "algo.kl_cov_frac=0.002", "algo.kl_cov_coef=1.0"],
    "cispo": ["algo.surrogate=cispo", "algo.eps_low=0.2", "algo.eps_high=0.28",
              "algo.dual_clip=10"] + _OFF,
    "dppo": ["algo.surrogate=dppo", "algo.dppo_delta_low=0.2", "algo.dppo_delta_high=0.2",
             "algo.dual_clip=10"] + _OFF,
}
LABELS = {"dapo": "DAPO", "dapo_erc_080": "DAPO+ERC 0.8-1.2",
          "dapo_erc_090": "DAPO+ERC 0.9-1.1", "dapo_erc_095": "DAPO+ERC 0.95-1.05",
          "gppo": "GPPO", "gppo_erc": "GPPO+ERC 0.95-1.05", "dapo_clip_cov": "DAPO+Clip-Cov",
          "dapo_kl_cov": "DAPO+KL-Cov", "cispo": "CISPO", "dppo": "DPPO"}
BASELINE = "dapo"
"""Every variant is compared with this one, paired by seed, within each regime."""

REGIMES = {"u2": ["run.updates_per_rollout=2"], "u8": ["run.updates_per_rollout=8"]}
"""name -> run overrides; every regime starts from the same task and SFT warm start."""
REGIME_LABELS = {"u2": "2 updates per rollout", "u8": "8 updates per rollout"}

MECHANISMS = {  # what each variant's own mechanism touches: (label, summed metric names)
    "erc": ("ERC dropped", ("erc/dropped_frac",)),
    "clip": ("PPO clip (low+high+dual)", ("clip/low_frac", "clip/high_frac",
                                          "clip/dual_frac")),
    "cov": ("Clip-Cov/KL-Cov selected", ("cov/selected_frac",)),
    "dppo": ("DPPO masked", ("clip/low_frac", "clip/high_frac")),
    "top": ("80/20 kept", ("top_entropy/kept_frac",)),
}
"""``policy_loss``'s metrics (``POLICY_LOSS_METRICS``) behind each mechanism's token fraction.
With DPPO the clip/low and clip/high fractions are its masked tokens; with GPPO and CISPO the
clipped tokens keep a (bounded / weighted) gradient."""
TOUCHED = ("clip/low_frac", "clip/high_frac", "clip/dual_frac", "erc/dropped_frac",
           "cov/selected_frac")
"""A run's *touched* fraction: the sum of these (overlaps count twice)."""


def mechanisms(variant: str) -> list[str]:
    """The ``MECHANISMS`` a variant's overrides switch on."""
    o = " ".join(VARIANTS[variant])
    out = ["dppo" if "surrogate=dppo" in o else "clip"]
    if "algo.erc={" in o:
        out.append("erc")
    if "regularizer=clip_cov" in o or "regularizer=kl_cov" in o:
        out.append("cov")
    if "top_entropy_frac=" in o and "top_entropy_frac=null" not in o:
        out.append("top")
    return out


def run_dir(root: pathlib.Path, regime: str, variant: str, seed: int) -> pathlib.Path:
    return root / "rl" / regime / variant / f"seed{seed}"


def rel(path: pathlib.Path) -> str:
    """``path`` relative to the checkout (or working directory) when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
