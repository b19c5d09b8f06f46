"""tests/ci.py: a missing requirement skips locally and fails under CI, and nothing else skips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ci import in_ci, need_module, requires, skip_or_fail

TESTS = Path(__file__).resolve().parent
# skips and CI checks that bypass tests/ci.py (this file and ci.py itself excepted)
BYPASS = re.compile(r"pytest\.skip\b|importorskip|mark\.skip|environ[^\n]*[\"']CI[\"']")


def _ci(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Set (or, with ``None``, unset) the environment variable CI for one test."""
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "Yes"])
def test_ci_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _ci(monkeypatch, value)
    assert in_ci()


@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "on-a-laptop"])
def test_not_ci_values(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    _ci(monkeypatch, value)
    assert not in_ci()


def test_skip_or_fail_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    _ci(monkeypatch, None)
    with pytest.raises(pytest.skip.Exception, match="no dataset here"):
        skip_or_fail("no dataset here")


def test_skip_or_fail_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _ci(monkeypatch, "true")
    with pytest.raises(pytest.fail.Exception, match=r"no dataset here.*required under CI"):
        skip_or_fail("no dataset here")


def test_need_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    _ci(monkeypatch, "1")
    assert need_module("json") is json
    with pytest.raises(pytest.fail.Exception, match="no_such_module_for_ci_test"):
        need_module("no_such_module_for_ci_test")
    _ci(monkeypatch, "0")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_for_ci_test"):
        need_module("no_such_module_for_ci_test")


def test_requires(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(x: int, *, tmp: str = "") -> int:
        """A stand-in test taking arguments, as a test takes fixtures."""
        return x + 1

    assert requires(True, "never used")(probe) is probe
    unmet = requires(False, "the data set is missing")(probe)
    assert unmet.__name__ == "probe" and unmet.__wrapped__ is probe  # type: ignore[attr-defined]
    _ci(monkeypatch, None)
    with pytest.raises(pytest.skip.Exception, match="the data set is missing"):
        unmet(1)
    _ci(monkeypatch, "yes")  # read when the test runs, not when it is decorated
    with pytest.raises(pytest.fail.Exception, match="the data set is missing"):
        unmet(1, tmp="x")


def test_every_skip_goes_through_the_helper() -> None:
    """No test module skips, or reads CI, on its own: it would pass CI silently."""
    offenders = [
        f"{path.relative_to(TESTS)}:{n}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name not in ("ci.py", Path(__file__).name)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if BYPASS.search(line)
    ]
    assert offenders == [], "use tests/ci.py (skip_or_fail, need_module, requires):\n" + "\n".join(
        offenders
    )
