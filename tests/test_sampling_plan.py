"""The few-step samplers wired into a run: the plan from the run config, the server's half and
the site's half with real (tiny, untrained) networks, the hand-off message carrying the
multistep state, and the costs the report counts (docs/samplers.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from collafuse.cli import main
from collafuse.config import FederationConfig, ModelConfig, RunConfig
from collafuse.federation.messages import HandOff
from collafuse.schedule import make_schedule
from collafuse.solvers import full_chain_eps, solver_sample
from collafuse.training import (
    SamplingPlan,
    build_server_model,
    build_site_model,
    sampling_plan,
    server_eps_model,
    server_half,
    site_eps_model,
    site_finish,
    steps_per_sample,
)

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2))


def _fed(**kw: object) -> FederationConfig:
    base: dict[str, object] = dict(
        T=20, client_fraction=0.5, image_shape=(1, 8, 8), site_model=TINY, server_model=TINY
    )
    base.update(kw)
    return FederationConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sampler", "handoff"),
    [("ddim", "handoff"), ("dpmpp-2m", "handoff"), ("dpmpp-2m", "restart")],
)
def test_split_through_the_handoff_message_equals_the_unsplit_solver(
    sampler: str, handoff: str
) -> None:
    """Server half -> HandOff bytes -> site half equals one solver over the whole grid with
    the server's converted prediction above the cut and the site model below it."""
    torch.manual_seed(0)
    fed = _fed()
    schedule = make_schedule(fed.schedule, fed.T)
    server, site = build_server_model(fed).eval(), build_site_model(fed).eval()
    run = RunConfig(
        federation=fed,
        sampler=sampler,
        handoff=handoff,
        server_sample_steps=3,
        site_sample_steps=4,
        spacing="logsnr",
    )
    plan = sampling_plan(run, schedule)
    ids = torch.tensor([0, 1, 2, 0])
    x_tc, state = server_half(server, fed, schedule, ids, torch.Generator().manual_seed(1), plan)
    message = HandOff.build("site-0", x_tc, state=state)
    assert (message.state() is not None) == plan.carries_state
    got = site_finish(
        site,
        fed,
        schedule,
        message.x_tc(),
        torch.Generator(),
        plan=plan,
        state=message.state(),
    )
    server_eps = full_chain_eps(server_eps_model(server, fed, schedule, ids), schedule, fed.t_cut)
    site_eps = site_eps_model(site, fed, schedule, None)

    def whole_chain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return server_eps(x, t) if int(t[0]) > fed.t_cut else site_eps(x, t)

    x_T = torch.randn((4, *fed.image_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = solver_sample(
            whole_chain,
            schedule,
            x_T,
            sampler=sampler,  # type: ignore[arg-type]
            grid=plan.grid,
            restart_at=fed.t_cut if handoff == "restart" else None,
        ).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert steps_per_sample(fed, plan.grid) == (3, 4)


def test_the_plan_follows_the_run_config() -> None:
    fed = _fed()
    schedule = make_schedule(fed.schedule, fed.T)
    assert sampling_plan(RunConfig(federation=fed), schedule) == SamplingPlan()
    plan = sampling_plan(
        RunConfig(federation=fed, sampler="dpmpp-2m-sde", server_sample_steps=2), schedule
    )
    assert plan.grid is not None and plan.grid[0] == 20 and 10 in plan.grid
    assert plan.handoff == "restart" and not plan.carries_state  # the default
    handing = RunConfig(federation=fed, sampler="dpmpp-2m", handoff="handoff")
    assert sampling_plan(handing, schedule).carries_state
    for bad, match in (
        ({"sampler": "ddim", "federation": _fed(upload_mode="renoise")}, "upload_mode 'exact'"),
        ({"sampler": "dpmpp-2m", "sampler_eta": 0.5}, "ddim only"),
        ({"spacing": "logsnr"}, "for the solvers"),
        ({"sampler": "unipc"}, "sampler"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig.model_validate({"federation": fed.model_dump(), **bad})


@pytest.mark.slow
@pytest.mark.parametrize(("handoff", "factor"), [("handoff", 2), ("restart", 1)])
def test_simulate_counts_the_solvers_calls_and_bytes(
    tmp_path: Path, handoff: str, factor: int
) -> None:
    """Issue 11's acceptance line: `--sampler dpmpp-2m --sample-steps 3 10` at c = 0.9 gives
    10 site and 3 server network calls per sample; carrying the state doubles the hand-off."""
    cfg = tmp_path / "run.json"
    from test_federation import need_fmnist, tiny_run  # the tiny budgets of the federation tests

    need_fmnist()
    federation = _fed(T=100, client_fraction=0.9, image_shape=(1, 28, 28))
    run = tiny_run().model_copy(update={"federation": federation})
    cfg.write_text(json.dumps(run.to_json_dict()))
    out = tmp_path / "out"
    argv = ["simulate", "--config", str(cfg), "--out", str(out), "--quiet"]
    argv += ["--sampler", "dpmpp-2m", "--sample-steps", "3", "10", "--handoff", handoff]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    cost = report["cost"]
    assert cost["site_nfe_per_sample"] == 10 and cost["server_nfe_per_sample"] == 3
    samples = 3 * 12
    per_handoff = cost["bytes"]["by_kind"]["handoff"] / samples
    assert 28 * 28 * 4 * factor < per_handoff < 28 * 28 * 4 * factor + 400
    assert report["config"]["run"]["sampler"] == "dpmpp-2m"
