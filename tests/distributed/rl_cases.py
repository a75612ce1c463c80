"""Rank functions that run the real RL loop (``run.run_train``) inside a gloo world and report
what each rank did: the prompts it trained on, its optimizer steps and micro-batches, its
logged metrics. Counting wraps the real methods; nothing is replaced."""

from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny" / "dapo_erc.yaml"


def base_overrides(task: str, run_dir: str, steps: int) -> list[str]:
    task = pathlib.Path(task)
    return [f"run.dir={run_dir}", f"run.steps={steps}", f"model.path={task / 'init'}",
            f"model.tokenizer={task / 'tokenizer.model'}",
            f"data.path={task / 'data' / 'train.jsonl'}", "validation.path=null",
            "rollout.engine=embedded", "rollout.prompts_per_step=4", "rollout.n=4",
            "rollout.max_response_tokens=12", "run.micro_batch_size=8",
            "run.updates_per_rollout=2", "rollout.reward_fn=tests.e2e.rewards:parity_reward"]


def rl_run(rank: int, world: int, task: str, runs: list[tuple[str, list[str]]]) -> list[dict]:
    """``run_train`` once per ``(run_dir, overrides)`` in this world; per run: history,
    optimizer steps, training micro-batches and the kept prompts of every step."""
    from megatron_erc.config import load_config
    from megatron_erc.rollout import EmbeddedEngine
    from megatron_erc.trainer import rl
    from megatron_erc.trainer.actor import Actor
    from megatron_erc.trainer.colocate import Colocation
    from megatron_erc.trainer.config import TrainConfig
    from megatron_erc.trainer.run import run_train

    stats: dict = {}
    real = (rl.collect_rollout, Actor.step, Actor.forward_backward, Colocation._note,
            EmbeddedEngine.generate)

    def collect(*args, **kwargs):
        out = real[0](*args, **kwargs)
        stats["kept"].append([g[0].prompt_ids for g in out.groups])
        return out

    def step(self):
        stats["optimizer_steps"] += 1
        stats["events"].append("step")
        return real[1](self)

    def forward_backward(self, micro_batches, loss_fn, *, forward_only=False):
        if not forward_only:
            stats["micro_batches"] += len(micro_batches)
        return real[2](self, micro_batches, loss_fn, forward_only=forward_only)

    def note(self, name):
        stats["events"].append(name)
        return real[3](self, name)

    def generate(self, *args, **kwargs):
        stats["events"].append("generate")
        return real[4](self, *args, **kwargs)

    (rl.collect_rollout, Actor.step, Actor.forward_backward, Colocation._note,
     EmbeddedEngine.generate) = collect, step, forward_backward, note, generate
    results = []
    try:
        for run_dir, extra in runs:
            stats.update(kept=[], optimizer_steps=0, micro_batches=0, events=[])
            cfg = load_config(TrainConfig, CONFIG, base_overrides(task, run_dir, 1) + extra)
            history = run_train(cfg)
            results.append({"history": history, **{k: stats[k] for k in
                            ("kept", "optimizer_steps", "micro_batches", "events")}})
    finally:
        (rl.collect_rollout, Actor.step, Actor.forward_backward, Colocation._note,
         EmbeddedEngine.generate) = real
    return results
