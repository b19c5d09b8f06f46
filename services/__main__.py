"""``python -m collafuse.services``: the service commands without the rest of the CLI."""

from collafuse.services.cli import main

raise SystemExit(main())
