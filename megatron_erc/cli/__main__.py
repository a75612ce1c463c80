"""``python -m megatron_erc.cli`` (and ``torchrun ... -m megatron_erc.cli``): ``megatron-erc``."""

import sys

from megatron_erc.cli import main

sys.exit(main())
