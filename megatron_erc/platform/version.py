"""The megatron-core release this package is written against, checked on every platform.

Besides the CPU layer (which patches megatron-core symbols), the trainer uses private
megatron-core APIs (optimizer internals in the actor step and in checkpointing). Those break
silently, not loudly, on another release, so every such user calls
:func:`require_supported_megatron` first.
"""

from __future__ import annotations

SUPPORTED_MEGATRON = "0.16."
"""Version prefix of the supported megatron-core release line."""
TESTED_MEGATRON = "0.16.1"
"""The release the test suite runs against (``pyproject.toml`` requires >=0.16.1,<0.17)."""


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is not the release line this package was written for."""


def installed_megatron_version() -> str:
    """``megatron.core.__version__`` of the imported megatron-core (``"?"`` if it has none)."""
    import megatron.core

    return str(getattr(megatron.core, "__version__", "?"))


def require_supported_megatron(needed_by: str = "megatron-erc") -> str:
    """Return the installed megatron-core version, or raise ``UnsupportedMegatronError``.

    ``needed_by`` names what depends on the release (e.g. ``"the CPU platform layer"``), so
    the message says which part refuses to run.
    """
    version = installed_megatron_version()
    if not version.startswith(SUPPORTED_MEGATRON):
        raise UnsupportedMegatronError(
            f"megatron-core {version} is installed, but {needed_by} supports only "
            f"megatron-core {SUPPORTED_MEGATRON}x (it uses private APIs of that release); "
            f"install it with: pip install -c constraints.txt 'megatron-core=={TESTED_MEGATRON}'")
    return version
