"""HF <-> Megatron checkpoint conversion; same as ``megatron-erc convert ...``.

    python tools/convert.py hf-to-megatron --hf-dir D --out O --tp 2 --pp 1
    python tools/convert.py megatron-to-hf --ckpt O --out D2 [--tokenizer-dir T]
"""

import sys

from megatron_erc.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
