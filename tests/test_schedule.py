"""Schedules and the cut (docs/method.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from collafuse.schedule import check_t_cut, cut_step, make_schedule


@pytest.mark.parametrize(
    ("kind", "T"),
    [
        ("cosine", 10),
        ("cosine", 100),
        ("cosine", 1000),
        ("linear", 21),
        ("linear", 100),
        ("linear", 1000),
    ],
)
def test_schedule_shapes_and_ends(kind: str, T: int) -> None:
    s = make_schedule(kind, T)  # type: ignore[arg-type]
    assert s.alphas_cumprod.dtype == torch.float64
    assert s.alphas_cumprod.shape == (T + 1,) and s.betas.shape == (T + 1,)
    assert s.alphas_cumprod[0] == 1.0 and s.betas[0] == 0.0
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert s.abar(T) < 1e-3  # x_T is noise at any T (linear is scaled by 1000/T)


@pytest.mark.parametrize(("T", "abar_T"), [(100, 2.43e-7), (1000, 2.43e-9)])
def test_cosine_abar_is_the_product_of_clipped_betas(T: int, abar_T: float) -> None:
    s = make_schedule("cosine", T)
    assert s.betas[T].item() == pytest.approx(0.999)  # the last beta is clipped
    assert s.abar(T) == pytest.approx(s.abar(T - 1) * (1 - 0.999))
    assert s.abar(T) == pytest.approx(abar_T, rel=1e-3)  # docs/method.md: about 2e-7 at T = 100


@pytest.mark.parametrize(
    ("c", "abar"), [(0.2, 0.899), (0.5, 0.494), (0.8, 0.094), (0.9, 0.024), (0.95, 0.006)]
)
def test_reference_abar_at_the_cut(c: float, abar: float) -> None:
    s = make_schedule("cosine", 1000)
    assert round(s.abar(cut_step(c, 1000)), 3) == abar


def test_linear_unscaled_would_not_reach_noise() -> None:
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    assert math.isclose(torch.prod(1 - betas).item(), 0.36, abs_tol=0.01)  # the trap
    assert make_schedule("linear", 100).abar(100) < 1e-3


def test_cut_rounds_half_up() -> None:
    assert cut_step(0.25, 10) == 3  # Python's round(2.5) would give 2
    assert cut_step(0.35, 10) == 4
    assert cut_step(0.5, 100) == 50
    assert cut_step(1.0, 100) == 100


@pytest.mark.parametrize("c", [-0.1, 1.5, float("nan")])
def test_cut_refuses_fractions_outside_unit_interval(c: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cut_step(c, 100)


@pytest.mark.parametrize("c", [0.004, 0.996])
def test_cut_refuses_fractions_that_round_to_an_end(c: float) -> None:
    with pytest.raises(ValueError, match="rounds to"):
        cut_step(c, 100)


def test_centralized_needs_opt_in() -> None:
    with pytest.raises(ValueError, match="--centralized"):
        cut_step(0.0, 100)
    assert cut_step(0.0, 100, allow_centralized=True) == 0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        check_t_cut(101, 100)


def test_linear_needs_enough_steps_for_its_scaling() -> None:
    with pytest.raises(ValueError, match="T >= 21"):
        make_schedule("linear", 20)  # beta_T = 0.02 * 1000 / 20 = 1: the chain would collapse


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        make_schedule("cosine", 0)
