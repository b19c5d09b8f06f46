"""The U-Net: shapes, conditioning, and the default size ratio between the two sides."""

from __future__ import annotations

import pytest
import torch

from collafuse.config import FederationConfig
from collafuse.training import build_server_model, build_site_model
from collafuse.unet import UNet, UNetSpec, count_parameters


@pytest.mark.parametrize("spec", [UNetSpec(8, (1, 2)), UNetSpec(8, (1, 2, 2), 2, True)])
def test_output_shape_matches_input(spec: UNetSpec) -> None:
    model = UNet(spec, in_channels=1)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([1, 50, 100])).shape == x.shape


def test_condition_changes_the_prediction_and_is_required() -> None:
    torch.manual_seed(0)
    model = UNet(UNetSpec(8, (1, 2)), in_channels=1, num_classes=3)
    torch.nn.init.normal_(model.label_emb.weight)  # type: ignore[union-attr]
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    a = model(x, t, torch.tensor([0, 0]))
    b = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="conditional"):
        model(x, t)


def test_default_site_model_is_several_times_smaller_than_the_server() -> None:
    fed = FederationConfig()
    site, server = (
        count_parameters(build_site_model(fed)),
        count_parameters(build_server_model(fed)),
    )
    assert server >= 3 * site
    assert build_server_model(fed).num_classes == fed.n_sites  # conditioned on the site id


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="base_channels"):
        UNetSpec(6)
    with pytest.raises(ValueError, match="channel_mults"):
        UNetSpec(8, ())
