"""`collafuse stack run` says how training goes while it waits: each role's step, loss and an
ETA from the services' status routes (real HTTP against a stand-in status app)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from collafuse.services.stack import ServiceSpec, StackError, TrainingWatch

from .servicekit import live


def _spec(name: str, url: str) -> ServiceSpec:
    return ServiceSpec(name, [], {}, int(url.rsplit(":", 1)[1]))


def _status_app(statuses: list[dict[str, Any]]) -> FastAPI:
    """Answers ``/v1/status`` with the next of ``statuses`` (the last one repeats)."""
    app = FastAPI()

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return statuses.pop(0) if len(statuses) > 1 else statuses[0]

    return app


def test_progress_lines_then_done() -> None:
    trainer = [
        {"phase": "training", "step": 100, "max_steps": 600, "last_loss": 0.5},
        {"phase": "training", "step": 300, "max_steps": 600, "last_loss": 0.25},
        {"phase": "done", "step": 600, "max_steps": 600, "last_loss": 0.2},
    ]
    site = [{"phase": "trained", "step": 40, "train_steps": 40, "last_loss": 0.1}]
    said: list[str] = []
    with live(_status_app(trainer)) as t, live(_status_app(site)) as s:
        watch = TrainingWatch(
            [
                ("trainer-0", _spec("trainer-0", t.url), None, ("done",)),
                ("site-0", _spec("site-0", s.url), None, ("trained", "done")),
            ],
            said.append,
            every_s=0.0,
        )
        assert watch() is False
        assert watch() is False
        assert watch() is True
    assert said[0] == "training: trainer-0 100/600 loss 0.500; site-0 done (40 steps)"
    assert said[1].startswith("training: trainer-0 300/600 loss 0.250 ETA ")
    assert len(said) == 2  # nothing more once every role is done


def test_a_failed_role_stops_the_wait() -> None:
    failed = [{"phase": "failed", "error": "disk full", "step": 3}]
    with live(_status_app(failed)) as t:
        watch = TrainingWatch([("trainer-0", _spec("trainer-0", t.url), None, ("done",))], print)
        with pytest.raises(StackError, match="trainer-0 failed: disk full"):
            watch()
