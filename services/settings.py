"""Service settings from the environment (``docs/interfaces.md``) and the config file.

``COLLAFUSE_CONFIG`` names one JSON document: either a bare federation config (the fields of
:class:`collafuse.config.FederationConfig`) or a run config (:class:`collafuse.config.RunConfig`,
whose ``federation`` key holds the federation and whose other keys are the training budgets the
site runners and the trainer use by default). The coordinator serves the federation part; the
others check theirs against it by fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from collafuse.config import FederationConfig, RunConfig

__all__ = [
    "ConfigError",
    "Settings",
    "config_diff",
    "configure_logging",
    "load_config",
    "place_model",
    "resolve_device",
    "set_torch_threads",
]

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class ConfigError(ValueError):
    """A config file or setting that cannot be used; the message names it."""


def load_config(path: str | Path) -> tuple[FederationConfig, RunConfig]:
    """Read a federation or run config JSON; returns the federation and the run config
    (a bare federation gets the default run settings around it)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {p} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    try:
        if "federation" in raw:
            run = RunConfig.model_validate(raw)
        else:
            run = RunConfig(federation=FederationConfig.model_validate(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "(root)"
        raise ConfigError(f"config file {p}: {where}: {first.get('msg')}") from None
    return run.federation, run


def config_diff(a: FederationConfig, b: FederationConfig) -> str:
    """The fields where two federation configs differ, as ``name: a != b``."""
    da, db = a.to_json_dict(), b.to_json_dict()
    diffs = [
        f"{k}: {da.get(k)!r} != {db.get(k)!r}"
        for k in sorted(set(da) | set(db))
        if da.get(k) != db.get(k)
    ]
    return "; ".join(diffs) or "(no difference)"


def set_torch_threads(n: int | None = None) -> int:
    """Cap torch's intra-op threads (``COLLAFUSE_TORCH_THREADS``, default 1)."""
    import torch

    if n is None:
        raw = os.environ.get("COLLAFUSE_TORCH_THREADS", "1")
        try:
            n = int(raw)
        except ValueError:
            raise ConfigError(f"COLLAFUSE_TORCH_THREADS={raw!r}: want a positive integer") from None
    if n < 1:
        raise ConfigError(f"torch threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def configure_logging(level: str | None = None) -> None:
    name = (level or os.environ.get("COLLAFUSE_LOG_LEVEL") or "info").lower()
    if name not in LOG_LEVELS:
        raise ConfigError(f"COLLAFUSE_LOG_LEVEL={name!r}: want one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=LOG_LEVELS[name], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(LOG_LEVELS[name])
    if name != "debug":  # one line per HTTP call is noise; payloads are never logged
        logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Settings:
    """The environment of one service (every field optional; each service checks its own)."""

    config: str | None = None
    coordinator_url: str | None = None
    server_url: str | None = None
    site_token: str | None = None
    site_tokens: str | None = None
    admin_token: str | None = None
    data: str | None = None
    site_dir: str = "/var/lib/collafuse/site"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            config=get("COLLAFUSE_CONFIG"),
            coordinator_url=get("COLLAFUSE_COORDINATOR_URL"),
            server_url=get("COLLAFUSE_SERVER_URL"),
            site_token=get("COLLAFUSE_SITE_TOKEN"),
            site_tokens=get("COLLAFUSE_SITE_TOKENS"),
            admin_token=get("COLLAFUSE_ADMIN_TOKEN"),
            data=get("COLLAFUSE_DATA"),
            site_dir=get("COLLAFUSE_SITE_DIR") or "/var/lib/collafuse/site",
        )

    def require(self, **names: Any) -> None:
        """Raise :class:`ConfigError` naming the first missing setting among ``names``
        (keyword: attribute name, value: the environment variable it comes from)."""
        for attr, env_name in names.items():
            if not getattr(self, attr):
                raise ConfigError(f"{env_name} is not set")


def resolve_device(name: str | None = None) -> str:
    """``COLLAFUSE_DEVICE`` (or ``name``): ``auto`` (default: CUDA when torch sees a GPU, else
    CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    choice = (name or os.environ.get("COLLAFUSE_DEVICE") or "auto").strip().lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "cuda" or (choice.startswith("cuda:") and choice[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {choice!r} requested but torch sees no CUDA GPU")
        return choice
    raise ConfigError(f"COLLAFUSE_DEVICE={choice!r}: want auto, cpu, cuda or cuda:N")


def place_model(model: Any, device: str) -> Any:
    """Put ``model`` on ``device`` and make its forward take and return CPU tensors.

    The core's loops keep their tensors on the CPU; on a GPU only the network runs there (its
    inputs move over, its output moves back), so the same core code serves both. Hooks do not
    change the ``state_dict`` keys. A no-op on the CPU."""
    if device == "cpu":
        return model
    import torch

    model.to(device)

    def inputs_to_device(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    def output_to_cpu(_: Any, __: Any, out: Any) -> Any:
        return out.to("cpu") if isinstance(out, torch.Tensor) else out

    model.register_forward_pre_hook(inputs_to_device)
    model.register_forward_hook(output_to_cpu)
    return model
