"""Finding plugins by walking a package: every concrete subclass of a base class, by a key attribute.

Detectors and sinks are discovered this way, so adding one is adding one file:
no list to edit, and the conformance suites pick it up automatically.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TypeVar

T = TypeVar("T")


def discover(package: str, base: type[T], key: str, skip: frozenset[str] = frozenset()) -> dict[str, type[T]]:
    """``{cls.<key>: cls}`` for every concrete subclass of ``base`` defined in a module of ``package``.

    Modules whose name starts with ``_`` (private helpers) or is in ``skip`` are not imported.
    """
    pkg = importlib.import_module(package)
    found: dict[str, type[T]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in skip:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, base) and obj is not base
                    and not inspect.isabstract(obj) and obj.__module__ == module.__name__):
                found[getattr(obj, key)] = obj
    return found
