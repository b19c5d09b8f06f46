"""Test-session settings shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:
    import torch
except ImportError:  # tests/deploy runs from the deployment tools' venv, which has no torch
    torch = None  # type: ignore[assignment]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tests run tiny tensors: one intra-op thread is faster than two fighting for 2 cores."""
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
