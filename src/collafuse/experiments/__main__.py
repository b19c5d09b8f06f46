"""``python -m collafuse.experiments sweep|advise ...``: the same commands as ``collafuse``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from collafuse import cli


def main(argv: Sequence[str] | None = None) -> int:
    """``collafuse.cli.main`` with ``sweep`` and ``advise`` registered (if not already)."""
    from collafuse.experiments.cli import add_experiment_commands

    make_parser = cli.make_parser

    def parser_with_experiments() -> object:
        parser = make_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        if "sweep" not in (getattr(sub, "choices", None) or {}):
            add_experiment_commands(sub)
        return parser

    cli.make_parser = parser_with_experiments  # type: ignore[assignment]
    try:
        return cli.main(argv)
    finally:
        cli.make_parser = make_parser


if __name__ == "__main__":
    sys.exit(main())
