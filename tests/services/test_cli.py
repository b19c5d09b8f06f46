"""The service commands: bad input is one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import json

import pytest

from collafuse.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("COLLAFUSE_"):
            monkeypatch.delenv(name)


def _fails(capsys, argv: list[str], words: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert words in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_coordinator_without_a_config(capsys):
    _fails(capsys, ["coordinator"], "COLLAFUSE_CONFIG")


def test_coordinator_with_a_missing_or_bad_config(capsys, tmp_path):
    _fails(capsys, ["coordinator", "--config", str(tmp_path / "nope.json")], "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"T": 10, "client_fraction": 2}))
    _fails(capsys, ["coordinator", "--config", str(bad)], "client fraction")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    _fails(capsys, ["coordinator", "--config", str(garbage)], "not readable JSON")


def test_coordinator_with_a_bad_tokens_file(capsys, tmp_path):
    config = tmp_path / "fed.json"
    config.write_text(json.dumps({"T": 10}))
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"site-0": "not-a-hash"}))
    _fails(capsys, ["coordinator", "--config", str(config), "--site-tokens", str(tokens)], "sha256")


def test_site_needs_its_credential_and_coordinator(capsys, monkeypatch):
    _fails(capsys, ["site", "--site-id", "site-0"], "COLLAFUSE_SITE_TOKEN")
    monkeypatch.setenv("COLLAFUSE_SITE_TOKEN", "t")
    _fails(capsys, ["site", "--site-id", "site-0"], "COLLAFUSE_COORDINATOR_URL")


def test_site_with_an_unreachable_coordinator(capsys, monkeypatch):
    monkeypatch.setenv("COLLAFUSE_SITE_TOKEN", "t")
    monkeypatch.setenv("COLLAFUSE_DATA", "/nonexistent")
    monkeypatch.setenv("COLLAFUSE_COORDINATOR_URL", "http://127.0.0.1:9")
    _fails(
        capsys,
        ["site", "--site-id", "site-0", "--wait-coordinator", "0"],
        "cannot get the federation config",
    )


def test_trainer_needs_the_coordinator(capsys):
    _fails(capsys, ["server", "train"], "COLLAFUSE_COORDINATOR_URL")


def test_server_serve_without_any_config(capsys):
    _fails(capsys, ["server", "serve"], "no federation config")


def test_flag_errors_are_one_line(capsys):
    _fails(capsys, ["server", "serve", "--max-batch", "0"], "must be >= 1")
    _fails(capsys, ["coordinator", "--port", "70000"], "65535")


def test_stack_errors(capsys, tmp_path):
    _fails(capsys, ["stack", "down", "--out", str(tmp_path / "none")], "no stack recorded")
    _fails(capsys, ["stack", "up", "--out", str(tmp_path / "x"), "--sites", "0"], "--sites")
    _fails(capsys, ["stack", "run", "--out", str(tmp_path / "x"), "--threads", "0"], "--threads")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    _fails(capsys, ["stack", "up", "--out", str(tmp_path / "full")], "not empty")
    _fails(
        capsys,
        ["stack", "run", "--out", str(tmp_path / "y"), "--data", str(tmp_path / "no-data")],
        "does not exist",
    )


def test_a_service_refuses_a_config_that_differs_from_the_coordinators(
    capsys, monkeypatch, tmp_path, store, auth
):
    from collafuse.services.coordinator.app import create_coordinator_app

    from .servicekit import ADMIN, live, tiny_fed

    fed = tiny_fed()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(tiny_fed(client_fraction=0.8).to_json_dict()))
    with live(create_coordinator_app(fed, store, auth)) as coordinator:
        monkeypatch.setenv("COLLAFUSE_COORDINATOR_URL", coordinator.url)
        monkeypatch.setenv("COLLAFUSE_ADMIN_TOKEN", ADMIN)
        monkeypatch.setenv("COLLAFUSE_STORE", f"file://{store.root}")
        _fails(capsys, ["server", "serve", "--config", str(mine)], "t_cut: 16 != 10")
        monkeypatch.setenv("COLLAFUSE_ADMIN_TOKEN", "wrong")
        _fails(capsys, ["server", "serve"], "401")


def test_site_refuses_images_of_the_wrong_shape_before_any_work(capsys, monkeypatch, tmp_path):
    """A site whose images are not the federation's shape stops in one line naming the flags
    that convert them, with nothing written to its private folder."""
    from imagesets import write_shapes

    from collafuse.services.http import Auth, hash_token
    from collafuse.store import FileStore

    from .servicekit import TOKENS, coordinator_app, live, tiny_fed

    fed = tiny_fed(image_shape=(1, 16, 16))
    auth = Auth({s: hash_token(t) for s, t in TOKENS.items()}, "admin-token-for-tests")
    data = write_shapes(tmp_path / "rgb", per_class=2)  # 3x40x40
    site_dir = tmp_path / "state"
    with live(coordinator_app(fed, FileStore(tmp_path / "store"), auth)) as coordinator:
        monkeypatch.setenv("COLLAFUSE_SITE_TOKEN", TOKENS["site-a"])
        monkeypatch.setenv("COLLAFUSE_COORDINATOR_URL", coordinator.url)
        argv = ["site", "--site-id", "site-a", "--data", str(data), "--site-dir", str(site_dir)]
        _fails(capsys, argv, "--channels 1 --image-size 16")
        _fails(capsys, [*argv, "--image-size", "16"], "--channels 1 --image-size 16")
    assert not site_dir.exists() or not any(site_dir.iterdir())


@pytest.mark.parametrize(
    ("error", "code", "word"),
    [
        ("value", 2, "error"),
        ("data", 2, "error"),
        ("store", 1, "failed"),
        ("service", 1, "failed"),
        ("os", 1, "failed"),
    ],
)
def test_runtime_failures_exit_1_and_bad_input_exits_2(capsys, error, code, word):
    """The same split as the core's commands: 2 for bad input, 1 for a failure at run time."""
    from collafuse.data import DataError
    from collafuse.services.cli import _guard
    from collafuse.services.client import ServiceError
    from collafuse.store import StoreUnavailable

    raised = {
        "value": ValueError("bad --flag"),
        "data": DataError("no images"),
        "store": StoreUnavailable("bucket down"),
        "service": ServiceError("coordinator said 503"),
        "os": OSError("disk full"),
    }[error]

    def handler(args):
        raise raised

    assert _guard("thing", handler)(None) == code
    err = capsys.readouterr().err
    assert err.startswith(f"collafuse thing: {word}: ") and len(err.strip().splitlines()) == 1
