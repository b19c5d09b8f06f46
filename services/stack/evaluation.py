"""The stack's report: the services' metrics snapshot and the evaluation of the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collafuse.services.stack.plan import StackPlan, _client

SNAPSHOT_SERIES = (
    "collafuse_samples_total",
    "collafuse_sample_requests_total",
    "collafuse_train_steps_total",
    "collafuse_disclosures_total",
    "collafuse_bytes_received_total",
    "collafuse_bytes_sent_total",
    "collafuse_checkpoint_version",
    "collafuse_nfe_total",
    "collafuse_compute_seconds_total",
    "collafuse_privacy_epsilon",
    "collafuse_train_loss",
    "collafuse_sample_batch_size_count",
    "collafuse_sample_batch_size_sum",
    "collafuse_gpu_available",
)


def snapshot_metrics(plan: StackPlan) -> dict[str, Any]:
    """Scrape every service's ``/metrics`` into ``metrics/<service>.prom`` and return the
    main series as ``{service: {series{labels}: value}}``."""
    from prometheus_client.parser import text_string_to_metric_families

    folder = plan.out / "metrics"
    folder.mkdir(exist_ok=True)
    summary: dict[str, Any] = {}
    for spec in plan.services:
        with _client(spec.url, None) as c:
            text = c.get("/metrics").text
        (folder / f"{spec.name}.prom").write_text(text)
        series: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in SNAPSHOT_SERIES:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    series[f"{sample.name}{{{labels}}}"] = sample.value
        summary[spec.name] = series
    (folder / "snapshot.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def evaluate(
    plan: StackPlan,
    results: dict[str, Any],
    version: int,
    snapshot: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The report of ``collafuse simulate`` from what the services left behind."""
    from collafuse.federation.report import build_report, write_report
    from collafuse.federation.simulate import load_public_set
    from collafuse.schedule import make_schedule
    from collafuse.services.coordinator.ingest import ledger_from_store
    from collafuse.store import FileStore
    from collafuse.training import sampling_plan

    fed, run = plan.fed, plan.run
    schedule = make_schedule(fed.schedule, fed.T)
    store = FileStore(plan.out / "store")
    statuses = {}
    for site in fed.sites:
        with _client(plan.service(site).url, plan.site_tokens[site]) as c:
            statuses[site] = c.get("/v1/status", params={"losses": "true"}).json()
    outcomes = _site_outcomes(plan, results, statuses, _disclosed(plan, store, schedule))
    server = _server_outcome(plan, store, schedule, snapshot)
    ledger = {
        "uploaded_by_site": {s: statuses[s]["bytes"]["uploaded"] for s in fed.sites},
        "downloaded_by_site": {s: statuses[s]["bytes"]["downloaded"] for s in fed.sites},
        "by_kind": {
            k: sum(statuses[s]["bytes"][k] for s in fed.sites)
            for k in ("disclosure", "sample_request", "handoff")
        },
    }
    public = load_public_set(run)
    report = build_report(
        fed,
        run,
        schedule,
        outcomes,
        server,
        public=public.images if public is not None else None,
        ledger=ledger,
        grid=sampling_plan(run, schedule).grid,
        wall_seconds=wall_seconds,
        disclosures=ledger_from_store(store, fed.sites),
    )
    report["services"] = {
        "transport": "http (local stack: one process per service on 127.0.0.1)",
        "server_checkpoint_version": version,
        "trainer_replicas": sum(s.name.startswith("trainer-") for s in plan.services),
        "metrics_snapshot": "metrics/snapshot.json",
        "metrics": snapshot,
    }
    losses = {f"site {s.site}": s.losses for s in outcomes} | {"server": server.losses}
    write_report(plan.out, report, outcomes, losses)
    return report


def _disclosed(plan: StackPlan, store: Any, schedule: Any) -> dict[str, list[Any]]:
    """What the server holds of each site's images: every disclosure part in the store."""
    import torch

    from collafuse.services.coordinator.ingest import PREFIX, parse_disclosure_key
    from collafuse.training import server_training_set
    from collafuse.wire import decode_tensors

    disclosed: dict[str, list[torch.Tensor]] = {s: [] for s in plan.fed.sites}
    for key in store.list(f"{PREFIX}/"):
        info = parse_disclosure_key(key)
        if info is not None:
            tensors, _ = decode_tensors(store.get(key), max_bytes=2**40)
            disclosed[str(info["site"])].append(
                server_training_set(plan.fed, schedule, tensors).to(torch.float32)
            )
    return disclosed


def _site_outcomes(
    plan: StackPlan,
    results: dict[str, Any],
    statuses: dict[str, Any],
    disclosed: dict[str, list[Any]],
) -> list[Any]:
    """Each site's part of the evaluation: its data, uploads, hand-offs and samples."""
    import torch

    from collafuse.federation.report import SiteOutcome
    from collafuse.wire import decode_tensors

    collaborative = plan.fed.t_cut < plan.fed.T
    outcomes = []
    for site in plan.fed.sites:
        tensors, _ = decode_tensors(Path(results[site]["file"]).read_bytes(), max_bytes=2**40)
        status = statuses[site]
        outcomes.append(
            SiteOutcome(
                site=site,
                classes=plan.classes[site],
                train_images=plan.train[site].images,
                heldout_images=plan.heldout[site].images,
                disclosed=torch.cat(disclosed[site]) if disclosed[site] and collaborative else None,
                handoffs=tensors["x_tc"] if collaborative else None,
                samples=tensors["x0"],
                compute_seconds=status["compute_seconds"],
                nfe=status["nfe"],
                losses=status.get("losses", []),
            )
        )
    return outcomes


def _server_outcome(plan: StackPlan, store: Any, schedule: Any, snapshot: dict[str, Any]) -> Any:
    """The server's part: its published EMA model (for the membership attack), the trainers'
    compute and losses, and the serving NFEs and seconds from the metrics snapshot."""
    from collafuse.federation.report import ServerOutcome
    from collafuse.store import current_checkpoint
    from collafuse.training import build_server_model, model_from_bytes

    fed = plan.fed
    trainer_status = []
    for spec in plan.services:
        if spec.name.startswith("trainer-"):
            with _client(spec.url, None) as c:
                trainer_status.append(c.get("/v1/status", params={"losses": "true"}).json())
    found = current_checkpoint(store, "server")
    model = build_server_model(fed)
    if found is not None:
        model_from_bytes(found[1]["ema.safetensors"], model)
    model.eval()
    served = snapshot.get("server", {})
    return ServerOutcome(
        eps_model_for_site=(
            {s: _eps_for(model, plan, schedule, s) for s in fed.sites}
            if fed.t_cut < fed.T
            else None
        ),
        compute_seconds={
            "train": sum(t["compute_seconds"] for t in trainer_status),
            "sample": sum(
                v for k, v in served.items() if k.startswith("collafuse_compute_seconds_total")
            ),
        },
        nfe=int(sum(v for k, v in served.items() if k.startswith("collafuse_nfe_total"))),
        losses=trainer_status[0].get("losses", []) if trainer_status else [],
    )


def _eps_for(model: Any, plan: StackPlan, schedule: Any, site: str) -> Any:
    """The server model as ``site``'s eps predictor (its site id bound), without gradients."""
    import torch

    from collafuse.training import server_eps_model

    fed = plan.fed
    y_id = fed.site_index(site)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = (
            torch.full((len(x),), y_id, dtype=torch.long)
            if fed.server_conditioning == "site"
            else None
        )
        with torch.no_grad():
            return server_eps_model(model, fed, schedule, y)(x, t)

    return eps_model
