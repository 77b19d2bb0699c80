"""Models built only from fastdl ops and modules, each beside a plain-torch twin.

``specs()`` lists every model with how to build, feed and train it (:class:`ModelSpec`); the
tests, ``python -m bench --family models`` and ``python -m fastdl train <model>`` all use it.
"""

import importlib

from fastdl.models.spec import ModelSpec

GROUPS = ("vision", "sequence", "graph", "quantized")


def specs() -> dict[str, ModelSpec]:
    """Every model's spec by name, in the order of GROUPS."""
    found: dict[str, ModelSpec] = {}
    for group in GROUPS:
        for spec in importlib.import_module(f"fastdl.models.{group}").SPECS:
            found[spec.name] = spec
    return found


__all__ = ["GROUPS", "ModelSpec", "specs"]
