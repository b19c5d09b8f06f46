"""The local stack: every service as its own process on loopback, a filesystem store.

``collafuse stack up --out DIR`` partitions the data between the sites (as ``simulate`` does),
writes the config, credentials and each site's data under ``DIR``, and starts the coordinator,
the serving server, the trainer replica(s) and one runner per site in the background
(``DIR/stack.json`` records them); ``collafuse stack down --out DIR`` stops them.
``collafuse stack run --out DIR`` brings the stack up, drives the federation to the end
(disclosures, site and server training, sampling across all sites at once), evaluates into
``DIR/report.json`` (the schema of ``collafuse simulate``) plus a metrics snapshot
(``DIR/metrics/``), and brings it down, also on Ctrl-C or an error.

Layout of ``DIR``: ``config.json`` (the run), ``federation.json``, ``secrets/`` (admin token,
site tokens and their hashes; mode 0600), ``store/`` (the filesystem store), ``sites/<id>/``
(``data.npz`` and ``state/``, the site's private folder), ``logs/<service>.log``, ``stack.json``.

Each process runs in its own session (a terminal's Ctrl-C reaches only the launcher, which
stops the children in order); under ``stack run`` the children also get ``PR_SET_PDEATHSIG``,
so they die with the launcher even if it is killed outright.

The code: :mod:`.plan` (flags, files, commands), :mod:`.supervisor` (the processes),
:mod:`.driver` (readiness, training progress, sampling), :mod:`.evaluation` (the report),
:mod:`.commands` (``up``, ``down``, ``run``).
"""

from collafuse.services.stack.commands import cmd_down, cmd_run, cmd_up
from collafuse.services.stack.driver import TrainingWatch
from collafuse.services.stack.plan import (
    ServiceSpec,
    StackError,
    StackPlan,
    add_stack_arguments,
    plan_stack,
)
from collafuse.services.stack.supervisor import Stack, die_with_parent, stop_recorded

__all__ = [
    "ServiceSpec",
    "Stack",
    "StackError",
    "StackPlan",
    "TrainingWatch",
    "add_stack_arguments",
    "cmd_down",
    "cmd_run",
    "cmd_up",
    "die_with_parent",
    "plan_stack",
    "stop_recorded",
]
