import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_robust.training.objective import min_snr_weights


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_paper_formula(prediction_type):
    scheduler = DDPMScheduler()
    t = torch.arange(0, 1000, 37)
    alpha = scheduler.alphas_cumprod[t].double()
    snr = alpha / (1 - alpha)
    clamped = torch.clamp(snr, max=5.0)
    expected = {"epsilon": clamped / snr, "v_prediction": clamped / (snr + 1), "sample": clamped}[prediction_type]
    assert torch.allclose(min_snr_weights(scheduler.alphas_cumprod, t, 5.0, prediction_type), expected.float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_finite_with_zero_terminal_snr(prediction_type):
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0
    weights = min_snr_weights(scheduler.alphas_cumprod, torch.arange(1000), 5.0, prediction_type)
    assert torch.isfinite(weights).all()
    if prediction_type == "epsilon":
        assert weights[-1].item() == 1.0
    else:
        assert weights[-1].item() == 0.0


def test_min_snr_rejects_bad_gamma_and_prediction_type():
    alphas = DDPMScheduler().alphas_cumprod
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(alphas, torch.tensor([1]), 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(alphas, torch.tensor([1]), 5.0, "noise")

