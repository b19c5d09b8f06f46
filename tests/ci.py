"""The one way a test gives up on a missing requirement: skip locally, fail under CI.

A dataset, tool or package that is missing must never let CI pass silently, so every test in
tests/ that cannot run reaches :func:`skip_or_fail` (directly, or through :func:`need_module`
and :func:`requires`). CI is "set" when the environment variable ``CI`` is ``1``, ``true`` or
``yes`` (any case), as GitHub Actions, GitLab CI and most runners set it.

Imported as ``ci`` (pytest puts tests/ on ``sys.path``: it has no ``__init__.py``) from tests/,
tests/services and tests/deploy alike; tests/deploy runs in a venv without torch, so this
module imports nothing but the standard library and pytest.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn, TypeVar

import pytest

__all__ = ["IN_CI", "in_ci", "need_module", "requires", "skip_or_fail"]

_F = TypeVar("_F", bound=Callable[..., Any])
_TRUTHY = ("1", "true", "yes")


def in_ci() -> bool:
    """Whether the environment variable ``CI`` is set to 1, true or yes (any case), now."""
    return os.environ.get("CI", "").strip().lower() in _TRUTHY


IN_CI: bool = in_ci()
""":func:`in_ci` when the test session imported this module."""


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test with ``reason``; under CI, fail it instead.

    Either way the report names the test's location, not this helper's.
    """
    if in_ci():
        pytest.fail(f"{reason} (required under CI: a missing requirement fails, never skips)")
    skipped = pytest.skip.Exception(reason)
    skipped._use_item_location = True  # as pytest's own skipif and fixture skips do
    raise skipped


def need_module(name: str) -> ModuleType:
    """``import name``, or :func:`skip_or_fail` (``pytest.importorskip`` that fails under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"{name} is not installed: {exc}")


def requires(condition: bool, reason: str) -> Callable[[_F], _F]:
    """Decorator, the CI-aware ``pytest.mark.skipif(not condition, reason=reason)``.

    With ``condition`` true the test is returned unchanged; otherwise its body is replaced by
    :func:`skip_or_fail` (fixtures and marks are kept: the wrapper has the test's signature).
    """

    def decorate(test: _F) -> _F:
        if condition:
            return test

        @functools.wraps(test)
        def unmet(*args: Any, **kwargs: Any) -> NoReturn:
            skip_or_fail(reason)

        return unmet  # type: ignore[return-value]

    return decorate
