"""The console contract of a successful run (issue 19): at most 100 lines, every one of them
ours (the bracketed prefixes below), no traceback, no line that
reads as a failure. vLLM's output belongs in RUN_DIR/logs/engine.log."""

from __future__ import annotations

import re

OURS = re.compile(r"^\[(demo|sft|convert|train|rl|summary|eval|setup|install_vllm)\] ")
FAILURE = re.compile(r"Traceback|\bERROR\b|\bFailed\b|\bfailed\b")


def assert_console_contract(output: str, max_lines: int = 100) -> list[str]:
    lines = [line for line in output.splitlines() if line.strip()]
    foreign = [line for line in lines if not OURS.match(line)]
    assert not foreign, "lines that are not ours:\n" + "\n".join(foreign[:40])
    failing = [line for line in lines if FAILURE.search(line)]
    assert not failing, "lines that read as failures:\n" + "\n".join(failing)
    assert len(lines) <= max_lines, f"{len(lines)} lines > {max_lines}"
    return lines
