"""The DreamBooth objective on random tensors, checked against hand computations and diffusers."""
import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.training.losses import add_noise, dreambooth_loss, prediction_target, sample_timesteps


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_add_noise_matches_diffusers(scheduler):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = add_noise(x0, eps, t, scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, eps, t))


def test_epsilon_target_is_the_noise(scheduler):
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    assert torch.equal(prediction_target(x0, eps, t, scheduler.alphas_cumprod, "epsilon"), eps)


def test_v_target_matches_hand_formula_and_diffusers(scheduler):
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    v = prediction_target(x0, eps, t, scheduler.alphas_cumprod, "v_prediction")
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, eps, t))


def test_unknown_prediction_type_is_refused(scheduler):
    with pytest.raises(ValueError, match="sample"):
        prediction_target(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]),
                          scheduler.alphas_cumprod, "sample")


def test_loss_splits_instance_and_prior_rows():
    target = torch.zeros(4, 1, 1, 2)
    pred = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 1, 2)
    is_prior = torch.tensor([False, False, True, True])
    parts = dreambooth_loss(pred, target, is_prior, prior_weight=0.5)
    assert parts.instance.item() == pytest.approx((1 + 9) / 2)  # mean of squared errors, subject rows
    assert parts.prior.item() == pytest.approx((4 + 16) / 2)  # class rows
    assert parts.total.item() == pytest.approx(5 + 0.5 * 10)


def test_loss_without_class_rows_is_plain_mse():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    parts = dreambooth_loss(pred, target, torch.tensor([False, False]), prior_weight=1.0)
    torch.testing.assert_close(parts.total, torch.nn.functional.mse_loss(pred, target))
    assert parts.prior.item() == 0.0


def test_loss_gradient_reaches_prediction():
    pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    dreambooth_loss(pred, torch.zeros(2, 4, 2, 2), torch.tensor([False, True]), 1.0).total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_timesteps_are_seeded_and_in_range():
    a = sample_timesteps(64, 1000, torch.Generator().manual_seed(3))
    b = sample_timesteps(64, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000
