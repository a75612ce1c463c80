"""The files the demo and the ablation start from (``examples/tiny``, ``examples/ablation``),
found in the installed package or, in a source checkout, in ``examples/``.

A wheel ships them as package data under ``megatron_erc/examples/`` (pyproject's
``package-dir`` maps the checkout's ``examples/`` there), so a non-editable install runs the
demo; an editable install and a plain checkout read ``examples/`` itself.
"""

from __future__ import annotations

import importlib.resources
import pathlib

_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]


def checkout_root() -> pathlib.Path | None:
    """The source checkout this package runs from, or None for an installed package."""
    return _CHECKOUT if (_CHECKOUT / "examples").is_dir() and (
        _CHECKOUT / "pyproject.toml").is_file() else None


def example_path(relative: str) -> pathlib.Path:
    """``examples/<relative>`` (e.g. ``tiny/config.json``) as a file path."""
    packaged = importlib.resources.files("megatron_erc") / "examples" / relative
    if packaged.is_file():
        return pathlib.Path(str(packaged))
    checkout = _CHECKOUT / "examples" / relative
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(f"examples/{relative} is neither installed with megatron_erc nor "
                            f"in a checkout at {_CHECKOUT}; reinstall megatron-erc")
