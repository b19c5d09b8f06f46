"""Driving a running stack: wait for readiness, watch training, sample, then evaluate."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx

# ---------------------------------------------------------------------------------------------
# Waiting and driving
from collafuse.services.stack.evaluation import evaluate, snapshot_metrics
from collafuse.services.stack.plan import ServiceSpec, StackError, StackPlan, _client
from collafuse.services.stack.supervisor import Stack


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, stack: Stack | None, interval: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if stack is not None:
            stack.check_alive()
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_ready(plan: StackPlan, stack: Stack | None, timeout: float = 180.0) -> None:
    """Every service answers ``/readyz`` with 200."""

    def ready(c: httpx.Client) -> bool:
        return c.get("/readyz").status_code == 200

    for spec in plan.services:
        with _client(spec.url, None) as c:
            wait_until(
                f"{spec.name} to be ready ({spec.url}/readyz)", partial(ready, c), timeout, stack
            )


class _Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {message}", file=sys.stderr, flush=True)


class TrainingWatch:
    """A ``wait_until`` check that is true once every role has finished training, and says
    each role's step, last loss and an ETA every ``every_s`` seconds meanwhile (read from the
    services' ``/v1/status``), so a long training is not mistaken for a hang."""

    def __init__(
        self,
        roles: list[tuple[str, ServiceSpec, str | None, tuple[str, ...]]],
        say: Callable[[str], None],
        every_s: float = 15.0,
    ) -> None:
        self.roles, self.say, self.every_s = roles, say, every_s
        self.first: dict[str, tuple[float, int]] = {}
        self.last_said = time.monotonic()

    def __call__(self) -> bool:
        lines, done = [], True
        for name, spec, token, finished in self.roles:
            with _client(spec.url, token) as c:
                status = c.get("/v1/status").json()
            if status.get("phase") == "failed":
                raise StackError(f"{name} failed: {status.get('error')}")
            done = done and status.get("phase") in finished
            lines.append(self._line(name, status, status.get("phase") in finished))
        if not done and time.monotonic() - self.last_said >= self.every_s:
            self.say("training: " + "; ".join(lines))
            self.last_said = time.monotonic()
        return done

    def _line(self, name: str, status: dict[str, Any], finished: bool) -> str:
        step = int(status.get("step") or 0)
        total = int(status.get("max_steps") or status.get("train_steps") or 0)
        if finished:
            return f"{name} done ({step} steps)"
        now = time.monotonic()
        t0, s0 = self.first.setdefault(name, (now, step))
        loss = status.get("last_loss")
        text = f"{name} {step}/{total}" + (f" loss {loss:.3f}" if loss is not None else "")
        if step > s0 and total > step:
            text += f" ETA {(total - step) * (now - t0) / (step - s0):.0f} s"
        return text


def drive(plan: StackPlan, stack: Stack, timeout: float) -> dict[str, Any]:
    """Run the federation to the end and write the report; returns it."""
    say = _Progress()
    fed, run = plan.fed, plan.run
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    wait_ready(plan, stack, timeout=min(300.0, left()))
    say(
        f"stack ready: {len(plan.services)} processes on 127.0.0.1 "
        f"(coordinator {plan.service('coordinator').url})"
    )
    coord = _client(plan.service("coordinator").url, plan.admin_token)
    trainers = [s for s in plan.services if s.name.startswith("trainer-")]

    if fed.t_cut < fed.T:
        wait_until(
            "every site's disclosure",
            lambda: coord.get("/v1/status").json()["all_disclosed"],
            left(),
            stack,
            1.0,
        )
        say("all sites disclosed; the server trains on the pooled set")
    else:
        say("local-only (c = 1): nothing is disclosed and the server does not train")

    watch = TrainingWatch(
        [(spec.name, spec, None, ("done",)) for spec in trainers]
        + [
            (site, plan.service(site), plan.site_tokens[site], ("trained", "done"))
            for site in fed.sites
        ],
        say,
    )
    wait_until("every model to finish training", watch, left(), stack, 2.0)
    say("server and site training done")
    final = coord.get("/v1/status").json()["checkpoint"]["version"]
    with _client(plan.service("server").url, plan.admin_token) as srv:
        wait_until(
            f"the server to serve checkpoint v{final}",
            lambda: srv.get("/v1/model").json()["version"] >= final,
            left(),
            stack,
        )

    results: dict[str, Any] = {}
    errors: list[str] = []

    def generate(site: str) -> None:
        with httpx.Client(
            base_url=plan.service(site).url,
            timeout=left(),
            headers={"Authorization": f"Bearer {plan.site_tokens[site]}"},
        ) as c:
            r = c.post("/v1/generate", json={"n": run.samples_per_site})
            if r.status_code != 200:
                errors.append(f"{site}: {r.status_code} {r.text[:300]}")
            else:
                results[site] = r.json()

    threads = [threading.Thread(target=generate, args=(s,)) for s in fed.sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise StackError("sampling failed: " + "; ".join(errors))
    say(
        f"sampled {run.samples_per_site} images per site (server v{final}, batched across "
        f"{fed.n_sites} sites)"
    )
    snapshot = snapshot_metrics(plan)
    say("metrics snapshot written; evaluating")
    report = evaluate(plan, results, final, snapshot, time.perf_counter() - say.start)
    with contextlib.suppress(httpx.HTTPError):
        coord.put("/v1/reports/final", json=report)
    coord.close()
    say(f"report written: {plan.out / 'report.json'}")
    return report
