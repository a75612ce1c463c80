"""Checkpoints: HF directories <-> Megatron distributed checkpoints and resumable training
checkpoints, with one way of writing a directory safely.

- ``io``: the atomic publish (build under a temporary name, rename when complete), the
  side-file copy and the model metadata (``megatron_erc.json``) every kind shares;
- ``hf``: HF safetensors reading/writing and ``hf_to_megatron`` / ``megatron_to_hf`` at any
  TP/PP (``megatron-erc convert``);
- ``steps``: training checkpoints on disk: ``step_*`` directories, the ``COMPLETE`` marker
  with its file manifest, the newest intact one, pruning;
- ``train``: ``save_checkpoint`` / ``load_checkpoint`` of model, optimizer, LR schedule,
  RNG and trainer state, resumable at another TP/PP;
- ``optimizer_state``: the distributed optimizer's two formats on disk (``dp_reshardable``,
  ``fully_reshardable``) and loading them; ``rng``: every RNG state a rank restores;
- ``async_save``: ``CheckpointSaver``, how the trainer saves: now, or by a forked writer
  while training goes on.
"""
