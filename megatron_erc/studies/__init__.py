"""Studies run with the library, not part of its API: the ERC ablation
(``python -m megatron_erc.studies.ablation``; spec, runner and report in three modules, the
report importing only the spec)."""
