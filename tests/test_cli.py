"""The command line: bad input exits non-zero with one clear line and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collafuse.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collafuse.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--client-fraction", "1.5"], "client fraction must be in [0, 1]"),
        (["--client-fraction", "-0.2"], "client fraction must be in [0, 1]"),
        (["--client-fraction", "0.001"], "rounds to t_cut=0"),
        (["--client-fraction", "0.999"], "rounds to t_cut=100"),
        (["--client-fraction", "0"], "--centralized"),
        (["--t-cut", "500"], "t_cut must be an integer in 0..100"),
        (["--sites", "0"], "--sites must be between 1 and 64"),
        (["--schedule", "quadratic"], "invalid choice: 'quadratic'"),
        (["--data", "/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["--steps", "-3"], "site_train_steps"),
    ],
)
def test_bad_input_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    assert main(["simulate", "--out", str(out), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert needle in lines[0]
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    result = run_cli("simulate", "--out", str(tmp_path / "o"), "--client-fraction", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "collafuse: error: invalid configuration: client fraction must be in [0, 1], got 2.0"
    ]


def test_non_empty_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["simulate", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unwritable_output_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new directories even to root, unlike permission bits.
    assert main(["simulate", "--out", "/proc/collafuse-run"]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not Path("/proc/collafuse-run").exists()


def test_output_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["simulate", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert f.read_text() == "x"
