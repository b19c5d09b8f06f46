"""The network's parameterization (``prediction``: eps or v) and why v is the default.

Sampling always runs in eps form (docs/method.md §4); ``v`` only changes the network's target. The
split invariant must hold for v-parameterized predictors too, and v must remove the first
server step's 1/sqrt(alpha_T) = 31.6x amplification of the network's error.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import MU, SHAPE, S, server_predictor, site_predictor

from collafuse.config import FederationConfig
from collafuse.diffusion import (
    EpsModel,
    as_eps_model,
    ddpm_sample,
    denoise,
    disclose,
    eps_from_v,
    relative_abar,
    sample_prior,
    sample_timesteps,
    server_loss,
    server_sample,
    site_loss,
    site_sample,
    v_target,
)
from collafuse.schedule import Schedule, cut_step, make_schedule


def as_v_net(eps_model: EpsModel, schedule: Schedule, ref_t: int) -> EpsModel:
    """The v-network equivalent to an eps predictor: ``v = (eps - sqrt(1 - a) x_t) / sqrt(a)``."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = relative_abar(schedule, t, ref_t).view(-1, 1, 1, 1).to(x.dtype)
        return (eps_model(x, t) - (1 - a).sqrt() * x) / a.sqrt()

    return net


def test_v_and_eps_convert_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 64, generator=g, dtype=torch.float64).unbind(0)[:2]
    a = torch.tensor([0.3, 1e-6, 0.999], dtype=torch.float64)
    x0, eps = x0.view(1, 1, 8, 8).expand(3, 1, 8, 8), eps.view(1, 1, 8, 8).expand(3, 1, 8, 8)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(eps_from_v(v_target(x0, eps, a), x_t, a), eps, atol=1e-12)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8])
def test_split_equals_unsplit_with_v_networks(c: float) -> None:
    schedule = make_schedule("cosine", 100)
    t_cut = cut_step(c, 100)
    site = as_eps_model(as_v_net(site_predictor(schedule), schedule, 0), schedule, "v", 0)
    server = as_eps_model(
        as_v_net(server_predictor(schedule, t_cut), schedule, t_cut), schedule, "v", t_cut
    )
    g = torch.Generator().manual_seed(3)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    ref = ddpm_sample(site_predictor(schedule), schedule, x_T, g)
    g = torch.Generator().manual_seed(3)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    x_tc = server_sample(server, schedule, t_cut, x_T, g)
    out = site_sample(site, schedule, t_cut, x_tc, g)
    assert (out - ref).abs().max().item() < 1e-9
    assert abs(out.mean().item() - MU) < 0.03 and 0.9 < out.std().item() / S < 1.05


def test_v_losses_target_the_v_of_their_own_chain() -> None:
    """With a zero network the loss is the mean square of the target; replay the draws."""
    schedule, t_cut = make_schedule("cosine", 100), 40
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(512, 1, 4, 4, generator=g, dtype=torch.float64)
    x_tc = disclose(schedule, x0, t_cut, g)

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def replay(seed: int, low: int, high: int, ref_t: int, data: torch.Tensor) -> float:
        rg = torch.Generator().manual_seed(seed)
        t = sample_timesteps(len(data), low, high, rg)
        eps = torch.randn(data.shape, generator=rg, dtype=data.dtype)
        return float(v_target(data, eps, relative_abar(schedule, t, ref_t)).pow(2).mean())

    got = server_loss(zero, schedule, x_tc, t_cut, torch.Generator().manual_seed(9), prediction="v")
    assert got.item() == pytest.approx(replay(9, t_cut + 1, 100, t_cut, x_tc), rel=1e-12)
    got = site_loss(zero, schedule, x0, t_cut, torch.Generator().manual_seed(9), prediction="v")
    assert got.item() == pytest.approx(replay(9, 1, t_cut, 0, x0), rel=1e-12)
    with pytest.raises(ValueError, match="prediction"):
        site_loss(zero, schedule, x0, t_cut, torch.Generator(), prediction="x0")  # type: ignore[arg-type]


@pytest.mark.parametrize("c", [0.0, 0.6, 0.9])
def test_v_removes_the_first_server_steps_error_amplification(c: float) -> None:
    """Same output error ``delta`` on both parameterizations, one step ``T -> T-1``."""
    T, delta = 100, 0.01
    schedule = make_schedule("cosine", T)
    t_cut = cut_step(c, T, allow_centralized=True)
    exact = server_predictor(schedule, t_cut)
    x_T = sample_prior((256, 1, 4, 4), torch.Generator().manual_seed(1), dtype=torch.float64)

    def step(model: EpsModel) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        return denoise(model, schedule, x_T, [T, T - 1], g, ref_t=t_cut)

    def eps_off(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return exact(x, t) + delta

    v_net = as_v_net(exact, schedule, t_cut)

    def v_off(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_net(x, t) + delta

    ref = step(exact)
    gain_eps = float((step(eps_off) - ref).abs().max()) / delta
    gain_v = float((step(as_eps_model(v_off, schedule, "v", t_cut)) - ref).abs().max()) / delta
    alpha_T = schedule.abar(T) / schedule.abar(T - 1)
    assert gain_eps == pytest.approx(1 / math.sqrt(alpha_T), rel=0.01)  # 31.6 at T = 100
    assert gain_v < 0.15 and gain_v < gain_eps / 200


def test_prediction_is_part_of_the_federation() -> None:
    assert FederationConfig().prediction == "v"
    eps = FederationConfig(prediction="eps")
    assert eps.fingerprint() != FederationConfig().fingerprint()
    with pytest.raises(ValueError, match="prediction"):
        FederationConfig(prediction="x0")  # type: ignore[arg-type]
