"""The service commands of the ``collafuse`` console script.

:func:`add_service_commands` registers ``coordinator``, ``server serve``, ``server train``,
``site`` and ``stack up|down|run`` on an ``argparse`` subparsers object; each handler takes the
parsed namespace and returns an exit code. Bad input prints one line on stderr and returns 2;
no traceback. ``python -m collafuse.services`` runs the same commands on their own.

Settings come from the environment (``docs/interfaces.md``); flags override them. Secrets
(tokens, S3 keys) come from the environment only, never from the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collafuse.cli import add_sampler_flags, image_size_arg
from collafuse.config import FederationConfig, RunConfig

__all__ = ["add_service_commands", "main"]

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# Helpers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} must be in 0..65535")
    return value


def _add_listen(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=_port, default=port, help="port (default %(default)s)")
    p.add_argument(
        "--limit-concurrency",
        type=_positive_int,
        default=64,
        help="requests handled at once; more get 503 overloaded (default %(default)s)",
    )
    p.add_argument(
        "--config", default=None, help="federation or run config JSON (default: $COLLAFUSE_CONFIG)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads (default: $COLLAFUSE_TORCH_THREADS or 1)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the network runs: auto, cpu, cuda or cuda:N (default: $COLLAFUSE_DEVICE, "
        "else auto: CUDA when torch sees a GPU)",
    )


def resolve_device(name: str | None) -> str:
    from collafuse.services.settings import resolve_device as resolve

    return resolve(name)


def _setup(args: argparse.Namespace) -> Any:
    """Logging, torch threads and settings shared by every service command."""
    from collafuse.services.settings import Settings, configure_logging, set_torch_threads

    configure_logging()
    set_torch_threads(args.threads)
    return Settings.from_env()


def _local_config(
    args: argparse.Namespace, settings: Any
) -> tuple[FederationConfig | None, RunConfig]:
    from collafuse.services.settings import load_config

    path = args.config or settings.config
    if not path:
        return None, RunConfig()
    fed, run = load_config(path)
    return fed, run


def _federation(
    args: argparse.Namespace, settings: Any, token: str | None, wait_s: float
) -> tuple[FederationConfig, RunConfig]:
    """The federation as the coordinator serves it (checked against a local config if one
    is given), or the local config when no coordinator is configured."""
    from collafuse.services.client import ServiceClient, ServiceError
    from collafuse.services.settings import ConfigError, config_diff

    local, run = _local_config(args, settings)
    url = getattr(args, "coordinator_url", None) or settings.coordinator_url
    if not url:
        if local is None:
            raise ConfigError(
                "no federation config: set COLLAFUSE_COORDINATOR_URL or COLLAFUSE_CONFIG (--config)"
            )
        return local, run
    deadline = time.monotonic() + wait_s
    with ServiceClient(url, token, name="coordinator", retries=2, backoff=0.5) as client:
        while True:
            try:
                served = client.get_json("/v1/config")
                break
            except ServiceError as exc:
                if (exc.status is not None and exc.status < 500) or time.monotonic() > deadline:
                    raise ConfigError(
                        f"cannot get the federation config from {url}: {exc}"
                    ) from None
                time.sleep(1.0)
    fed = FederationConfig.model_validate(served["federation"])
    if fed.fingerprint() != served["fingerprint"]:
        raise ConfigError(
            "the coordinator's config does not match its fingerprint "
            "(different collafuse versions?)"
        )
    if local is not None and local.fingerprint() != fed.fingerprint():
        raise ConfigError(f"local config differs from the coordinator's: {config_diff(local, fed)}")
    return fed, run


def _store(args: argparse.Namespace) -> Any:
    from collafuse.store import store_from_env

    env = dict(os.environ)
    if getattr(args, "store", None):
        env["COLLAFUSE_STORE"] = args.store
    return store_from_env(env)


def _serve(app: Any, args: argparse.Namespace, holder: dict[str, Any] | None = None) -> None:
    """Serve ``app`` with uvicorn on ``args.host:args.port``, bounded in concurrency (a flood
    of connections gets 503s, not memory) and in idle keep-alive time."""
    import uvicorn

    limits = getattr(getattr(app, "state", None), "limits", None)
    if limits is not None:
        limits.max_in_flight = args.limit_concurrency
    debug = os.environ.get("COLLAFUSE_LOG_LEVEL", "info").lower() == "debug"
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        # the app answers 503 `overloaded` (JSON) past the limit; uvicorn's own plain-text 503
        # is the backstop for connections that never become requests
        limit_concurrency=2 * args.limit_concurrency,
        timeout_keep_alive=5,
        log_level="info" if debug else "warning",
        access_log=debug,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    if holder is not None:
        holder["server"] = server
    server.run()


def _guard(name: str, fn: Handler) -> Handler:
    """Run a handler; expected failures become one line on stderr: exit 2 for bad input
    (flags, settings, config, data), 1 for a runtime failure (a peer, the store, the OS), as
    in the core's ``collafuse`` commands."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from collafuse.data import DataError
        from collafuse.services.client import ServiceError
        from collafuse.store import StoreError

        try:
            return fn(args)
        except KeyboardInterrupt:
            print(f"collafuse {name}: interrupted", file=sys.stderr)
            return 130
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            print(f"collafuse {name}: error: {where}: {first.get('msg')}", file=sys.stderr)
            return 2
        except (ValueError, DataError) as exc:  # bad flags, settings, config or data: usage
            print(f"collafuse {name}: error: {exc}", file=sys.stderr)
            return 2
        except (ServiceError, StoreError, OSError) as exc:  # a peer, the store or the OS failed
            print(f"collafuse {name}: failed: {exc}", file=sys.stderr)
            return 1

    return run


# ---------------------------------------------------------------------------------------------
# coordinator


def _coordinator(args: argparse.Namespace) -> int:
    from collafuse.services.coordinator.app import CoordinatorOptions, create_coordinator_app
    from collafuse.services.http import Auth
    from collafuse.services.settings import ConfigError

    settings = _setup(args)
    fed, _ = _local_config(args, settings)
    if fed is None:
        raise ConfigError(
            "the coordinator needs the federation config: set COLLAFUSE_CONFIG or --config"
        )
    auth = Auth.from_files(args.site_tokens or settings.site_tokens, settings.admin_token)
    missing = [s for s in fed.sites if s not in auth.sites]
    if missing:
        log.warning("no credential for site(s) %s: they cannot upload", ", ".join(missing))
    options = CoordinatorOptions(
        replicas=args.replicas,
        aggregation_window_s=args.aggregation_window,
        max_images=args.max_images,
        min_upload=min(args.min_upload, args.max_images),
    )
    app = create_coordinator_app(fed, _store(args), auth, options)
    _serve(app, args)
    return 0


def _add_coordinator(sub: Any) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the aggregation coordinator",
        description="Site registry, federation config, disclosure ingest, "
        "replica averaging and the checkpoint manifest.",
    )
    _add_listen(p, 8000)
    p.add_argument("--store", default=None, help="store URL (default: $COLLAFUSE_STORE)")
    p.add_argument(
        "--site-tokens",
        default=None,
        help="JSON file of site token hashes (default: $COLLAFUSE_SITE_TOKENS)",
    )
    p.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        help="trainer replicas averaged per round (default %(default)s)",
    )
    p.add_argument(
        "--aggregation-window",
        type=_positive_float,
        default=60.0,
        help="seconds after a round's first push before it closes with the pushes "
        "it has (default %(default)s)",
    )
    p.add_argument(
        "--max-images",
        type=_positive_int,
        default=20000,
        help="images per disclosure upload (default %(default)s)",
    )
    p.add_argument(
        "--min-upload",
        type=_positive_int,
        default=32,
        help="images per upload at least, unless it completes the site's declared count "
        "(default %(default)s)",
    )
    p.set_defaults(handler=_guard("coordinator", _coordinator))


# ---------------------------------------------------------------------------------------------
# server serve / server train


def _server_serve(args: argparse.Namespace) -> int:
    from collafuse.services.http import Auth
    from collafuse.services.server.app import ServeOptions, create_server_app

    settings = _setup(args)
    fed, _ = _federation(args, settings, settings.admin_token, args.wait_coordinator)
    auth = Auth.from_files(args.site_tokens or settings.site_tokens, settings.admin_token)
    options = ServeOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_request=args.max_request,
        batching=not args.no_batching,
        poll_s=args.poll_s,
        default_steps=args.steps,
        seed=args.seed,
        device=resolve_device(args.device),
    )
    _serve(create_server_app(fed, _store(args), auth, options), args)
    return 0


def _server_train(args: argparse.Namespace) -> int:
    from collafuse.services.client import ServiceClient
    from collafuse.services.server.trainer import TrainerLoop, TrainOptions, create_trainer_app
    from collafuse.services.settings import ConfigError

    settings = _setup(args)
    url = args.coordinator_url or settings.coordinator_url
    if not url:
        raise ConfigError("the trainer pushes to the coordinator: set COLLAFUSE_COORDINATOR_URL")
    fed, run = _federation(args, settings, settings.admin_token, args.wait_coordinator)
    if args.wait_for not in ("all", "any") and not args.wait_for.isdigit():
        raise ConfigError(f"--wait-for {args.wait_for!r}: want all, any or a number of sites")
    options = TrainOptions(
        replica=args.replica or socket.gethostname(),
        steps_per_round=args.steps_per_round or run.checkpoint_every,
        max_steps=run.server_train_steps if args.max_steps is None else args.max_steps,
        batch_size=args.batch_size or run.batch_size,
        lr=args.lr or run.lr,
        ema_decay=run.ema_decay,
        wait_for=args.wait_for,
        seed=args.seed,
        device=resolve_device(args.device),
    )
    holder: dict[str, Any] = {}
    result: dict[str, str] = {}

    def on_done(loop: TrainerLoop) -> None:
        result["phase"] = loop.phase
        if args.exit_when_done and "server" in holder:
            holder["server"].should_exit = True

    coordinator = ServiceClient(
        url, settings.admin_token, name="coordinator", fingerprint=fed.fingerprint()
    )
    app = create_trainer_app(fed, _store(args), coordinator, options, on_done=on_done)
    _serve(app, args, holder)
    if result.get("phase") == "failed":
        print(f"collafuse server train: error: {app.state.loop.error}", file=sys.stderr)
        return 1
    return 0


def _add_server(sub: Any) -> None:
    p = sub.add_parser("server", help="run the server denoiser (serve or train)")
    roles = p.add_subparsers(dest="role", metavar="{serve,train}", required=True)

    s = roles.add_parser(
        "serve",
        help="answer sample requests with hand-offs",
        description="Serves hand-offs x_tc from the current server checkpoint, "
        "batching concurrent requests of many sites.",
    )
    _add_listen(s, 8001)
    s.add_argument("--store", default=None, help="store URL (default: $COLLAFUSE_STORE)")
    s.add_argument("--coordinator-url", default=None, help="default: $COLLAFUSE_COORDINATOR_URL")
    s.add_argument("--site-tokens", default=None, help="default: $COLLAFUSE_SITE_TOKENS")
    s.add_argument(
        "--max-batch",
        type=_positive_int,
        default=256,
        help="samples per shared forward pass (default %(default)s)",
    )
    s.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long to collect requests into a batch (default %(default)s)",
    )
    s.add_argument(
        "--max-request",
        type=_positive_int,
        default=256,
        help="samples per request (default %(default)s)",
    )
    s.add_argument(
        "--no-batching",
        action="store_true",
        help="answer one request at a time (the naive baseline)",
    )
    s.add_argument(
        "--poll-s",
        type=_positive_float,
        default=5.0,
        help="checkpoint manifest poll interval (default %(default)s)",
    )
    s.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="respaced server steps (default: every step)",
    )
    s.add_argument("--seed", type=int, default=None, help="server noise seed (default: random)")
    s.add_argument(
        "--wait-coordinator",
        type=float,
        default=120.0,
        help="seconds to wait for the coordinator at start (default %(default)s)",
    )
    s.set_defaults(handler=_guard("server serve", _server_serve))

    t = roles.add_parser(
        "train",
        help="train on the pooled disclosures",
        description="Trains the shared model on the disclosures in the store "
        "and pushes its weights to the coordinator each round.",
    )
    _add_listen(t, 8003)
    t.add_argument("--store", default=None, help="store URL (default: $COLLAFUSE_STORE)")
    t.add_argument("--coordinator-url", default=None, help="default: $COLLAFUSE_COORDINATOR_URL")
    t.add_argument("--replica", default=None, help="replica id (default: the host name)")
    t.add_argument(
        "--steps-per-round",
        type=_positive_int,
        default=None,
        help="steps between pushes (default: the run config's checkpoint_every)",
    )
    t.add_argument(
        "--max-steps",
        type=_non_negative_int,
        default=None,
        help="total steps (default: the run config's server_train_steps)",
    )
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--lr", type=_positive_float, default=None)
    t.add_argument(
        "--wait-for",
        default="all",
        help="start when all sites, any site, or N sites have disclosed (default %(default)s)",
    )
    t.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once max steps are published (default: stay up, idle)",
    )
    t.add_argument("--seed", type=int, default=None, help="minibatch seed (default: random)")
    t.add_argument(
        "--wait-coordinator",
        type=float,
        default=120.0,
        help="seconds to wait for the coordinator at start (default %(default)s)",
    )
    t.set_defaults(handler=_guard("server train", _server_train))


# ---------------------------------------------------------------------------------------------
# site


def _site(args: argparse.Namespace) -> int:
    from collafuse.data import load_dataset
    from collafuse.data.shape import check_data_shape
    from collafuse.services.client import ServiceClient
    from collafuse.services.metrics import ServiceMetrics
    from collafuse.services.settings import ConfigError
    from collafuse.services.site.app import create_site_app
    from collafuse.services.site.runner import SiteOptions, SiteRunner
    from collafuse.training import SamplerOptions

    settings = _setup(args)
    token = settings.site_token
    url = args.coordinator_url or settings.coordinator_url
    if not token:
        raise ConfigError("the site needs its credential: set COLLAFUSE_SITE_TOKEN")
    if not url:
        raise ConfigError("the site uploads to the coordinator: set COLLAFUSE_COORDINATOR_URL")
    data = args.data or settings.data
    if not data:
        raise ConfigError("the site's images: set COLLAFUSE_DATA or --data")
    fed, run = _federation(args, settings, token, args.wait_coordinator)
    if args.site_id not in fed.sites:
        raise ConfigError(
            f"--site-id {args.site_id!r} is not in the federation ({', '.join(fed.sites)})"
        )
    dataset = load_dataset(  # the flags, else the run config's image_size / channels
        data, size=args.image_size or run.image_size, channels=args.channels or run.channels
    )
    check_data_shape(dataset, fed.image_shape)  # before any training: the fix in one line
    server_url = args.server_url or settings.server_url
    options = SiteOptions(
        site=args.site_id,
        site_dir=Path(args.site_dir or settings.site_dir),
        train_steps=run.site_train_steps if args.train_steps is None else args.train_steps,
        batch_size=args.batch_size or run.batch_size,
        lr=args.lr or run.lr,
        ema_decay=run.ema_decay,
        checkpoint_every=run.checkpoint_every,
        time_budget_s=args.time_budget_s or run.time_budget_s,
        samples=args.samples,
        sample_request=args.sample_request,
        server_steps=args.server_steps or run.server_sample_steps,
        site_steps=args.site_steps or run.site_sample_steps,
        sampling=SamplerOptions(
            args.sampler or run.sampler,
            args.spacing or run.spacing,
            run.sampler_eta if args.eta is None else args.eta,
            args.handoff or run.handoff,
        ),
        clip_x0=run.clip_x0,
        fp16=args.fp16,
        prefetch=not args.no_prefetch,
        seed=args.seed,
        device=resolve_device(args.device),
    )
    fp = fed.fingerprint()
    coordinator = ServiceClient(url, token, name="coordinator", fingerprint=fp)
    server = (
        ServiceClient(server_url, token, name="server", fingerprint=fp, timeout=600)
        if server_url
        else None
    )
    labels = dataset.labels if dataset.labels is not None else None

    def factory(metrics: ServiceMetrics) -> SiteRunner:
        return SiteRunner(fed, dataset.images, labels, coordinator, server, options, metrics)

    holder: dict[str, Any] = {}
    result: dict[str, str] = {}

    def on_done(runner: SiteRunner) -> None:
        result["phase"] = runner.phase
        if args.exit_when_done and "server" in holder:
            holder["server"].should_exit = True

    app = create_site_app(factory, token, on_done=on_done)
    _serve(app, args, holder)
    if result.get("phase") == "failed":
        print(f"collafuse site: error: {app.state.runner.error}", file=sys.stderr)
        return 1
    return 0


def _add_site(sub: Any) -> None:
    p = sub.add_parser(
        "site",
        help="run one site's runner",
        description="Trains the site's private model, uploads its disclosure "
        "once, and finishes the server's hand-offs locally.",
    )
    p.add_argument("--site-id", required=True, help="this site's id in the federation")
    _add_listen(p, 8002)
    p.add_argument("--data", default=None, help="the site's images (default: $COLLAFUSE_DATA)")
    p.add_argument(
        "--image-size",
        type=image_size_arg,
        metavar="N",
        help="bring the site's images to NxN (default: the run config's image_size, else as "
        "they are); the federation's image_shape must agree",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        help="1 (grey) or 3 (RGB), converting as needed (default: the run config's channels)",
    )
    p.add_argument(
        "--site-dir", default=None, help="private state folder (default: $COLLAFUSE_SITE_DIR)"
    )
    p.add_argument("--coordinator-url", default=None, help="default: $COLLAFUSE_COORDINATOR_URL")
    p.add_argument("--server-url", default=None, help="default: $COLLAFUSE_SERVER_URL")
    p.add_argument(
        "--train-steps",
        type=_non_negative_int,
        default=None,
        help="default: the run config's site_train_steps",
    )
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument("--time-budget-s", type=_positive_float, default=None)
    p.add_argument(
        "--samples",
        type=_non_negative_int,
        default=0,
        help="samples to generate after training (default 0: on request)",
    )
    p.add_argument(
        "--sample-request",
        type=_positive_int,
        default=100,
        help="hand-offs per server request (default %(default)s)",
    )
    p.add_argument("--server-steps", type=_positive_int, default=None)
    p.add_argument("--site-steps", type=_positive_int, default=None)
    add_sampler_flags(p)  # defaults: the run config's
    p.add_argument("--fp16", action="store_true", help="float16 tensors on the wire")
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="wait for each finished batch before requesting the next hand-offs",
    )
    p.add_argument(
        "--exit-when-done", action="store_true", help="exit after training (and --samples)"
    )
    p.add_argument("--seed", type=int, help="minibatch/sampling seed (never the disclosure noise)")
    p.add_argument(
        "--wait-coordinator",
        type=float,
        default=120.0,
        help="seconds to wait for the coordinator at start (default %(default)s)",
    )
    p.set_defaults(handler=_guard("site", _site))


# ---------------------------------------------------------------------------------------------
# stack


def _add_stack(sub: Any) -> None:
    from collafuse.services import stack

    p = sub.add_parser(
        "stack",
        help="the local stack: every service as a process on loopback",
        description="Coordinator, server (train + serve) and one runner per site "
        "as separate processes on 127.0.0.1, with a filesystem store.",
    )
    actions = p.add_subparsers(dest="action", metavar="{up,down,run}", required=True)
    up = actions.add_parser("up", help="start the stack in the background")
    stack.add_stack_arguments(up)
    up.set_defaults(handler=_guard("stack up", stack.cmd_up))
    down = actions.add_parser("down", help="stop a stack started with `stack up`")
    down.add_argument("--out", required=True, help="the stack's output folder")
    down.set_defaults(handler=_guard("stack down", stack.cmd_down))
    run = actions.add_parser("run", help="up, run the whole federation, report, down")
    stack.add_stack_arguments(run)
    run.set_defaults(handler=_guard("stack run", stack.cmd_run))


# ---------------------------------------------------------------------------------------------


def add_service_commands(subparsers: Any) -> None:
    """Register ``coordinator``, ``server serve|train``, ``site`` and ``stack up|down|run``;
    each sets ``handler`` (``namespace -> exit code``)."""
    _add_coordinator(subparsers)
    _add_server(subparsers)
    _add_site(subparsers)
    _add_stack(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m collafuse.services``: the service commands on their own."""
    # Before torch loads OpenMP (as in ``collafuse.cli.main``): spinning OpenMP workers make a
    # busy small machine many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="collafuse", description="CollaFuse services")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_service_commands(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args))
