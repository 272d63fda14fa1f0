import pytest
import torch
from conftest import make_tiny_unet

from diffusers_robust.models import LabelConditionedUNet, export_unet


def _trained_projection_model(label_dim=5):
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=label_dim)
    torch.nn.init.normal_(model.label_projection.weight, std=1.0)
    # A UNet fresh from init barely reacts to its time embedding; give the embedding path real weights.
    for module in model.unet.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model.eval()


def test_zero_labels_give_exactly_the_exported_plain_unet():
    model = _trained_projection_model()
    plain = export_unet(model).eval()
    assert plain.config.class_embed_type is None and plain.class_embedding is None
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 50, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), plain(x, t).sample)
        assert torch.equal(model(x, t, torch.zeros(3, 5)), plain(x, t).sample)


def test_non_zero_labels_change_the_prediction():
    model = _trained_projection_model()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        assert (model(x, t, torch.ones(2, 5)) - model(x, t)).abs().max() > 1e-3


def test_projection_starts_at_zero_so_training_starts_from_the_unconditioned_unet():
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=4)
    assert torch.count_nonzero(model.label_projection.weight) == 0


def test_wrong_label_shape_is_named():
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=4)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\)"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 3))


def test_no_conditioning_keeps_the_unet_as_is():
    unet = make_tiny_unet()
    model = LabelConditionedUNet(unet, label_dim=0)
    assert model.unet is unet


def test_the_dropout_option_rebuilds_the_preset_unet_with_the_same_initial_weights_and_drops_only_in_training():
    from diffusers_robust.pipelines.presets import build_pipeline_from_preset
    from diffusers_robust.training.setup import fit_unet

    plain = fit_unet(build_pipeline_from_preset("ddpm-digits", seed=3).unet, 1, 8, seed=3)
    dropping = fit_unet(build_pipeline_from_preset("ddpm-digits", seed=3).unet, 1, 8, seed=3, dropout=0.2)
    assert plain.config.dropout == 0.0 and dropping.config.dropout == 0.2
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropping.state_dict().values(), strict=True))
    sample, timestep = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        dropping.train()
        assert not torch.equal(dropping(sample, timestep).sample, dropping(sample, timestep).sample)
        dropping.eval(), plain.eval()
        assert torch.equal(dropping(sample, timestep).sample, plain(sample, timestep).sample)


def test_export_unet_copies_the_weights_it_is_built_from():
    unet = make_tiny_unet()
    exported = export_unet(LabelConditionedUNet(unet, label_dim=2))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), exported.state_dict().values(), strict=True))
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)  # training goes on: the exported copy must not move with it
    assert not torch.equal(next(unet.parameters()), next(exported.parameters()))
    assert not any(parameter.is_meta for parameter in exported.parameters())
