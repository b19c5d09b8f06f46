"""Fixtures of the service tests (helpers live in servicekit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collafuse.config import FederationConfig
from collafuse.services.http import Auth, hash_token
from collafuse.store import FileStore

from .servicekit import ADMIN, TOKENS, FlakyStore, tiny_fed


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def fed() -> FederationConfig:
    return tiny_fed()


@pytest.fixture
def auth() -> Auth:
    return Auth({s: hash_token(t) for s, t in TOKENS.items()}, ADMIN)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture
def flaky(tmp_path: Path) -> FlakyStore:
    return FlakyStore(tmp_path / "store")
