"""The Gaussian-mixture test target: its exact denoiser and the checks of its construction."""

import pytest
import torch

from fastflow.mixture import GaussianMixture


@pytest.mark.parametrize(
    "args,match",
    [
        (([[0, 0], [1, 1]], [1, 1], [0.5, 0.25, 0.25]), r"weights must be one per component \(2,\)"),
        (([[0, 0], [1, 1]], [1, 1, 1]), r"stds must be one per component \(2,\) or \[K, D\]"),
        (([[0, 0], [1, 1]], [-1, 1]), "stds must be positive"),
        (([0, 0], [1]), r"means must be \[K, D\]"),
        (([[0, 0], [1, 1]], [1, 1], [0.7, 0.7]), "sum to 1"),
    ],
)
def test_inconsistent_components_raise(args, match):
    """Three weights for two components sampled an IndexError at random, or broadcast in the denoiser."""
    with pytest.raises(ValueError, match=match):
        GaussianMixture(*args)


def test_denoiser_is_the_posterior_mean_of_one_component():
    """With one component, E[x | z] is the Gaussian posterior mean: mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z -
    alpha mu), per dimension."""
    mix = GaussianMixture([[0.5, -1.0]], [[0.3, 2.0]])
    z = torch.randn(7, 2, dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    mu, s2 = mix.means[0], mix.stds[0] ** 2
    want = mu + alpha * s2 / (alpha**2 * s2 + sigma**2) * (z - alpha * mu)
    torch.testing.assert_close(mix.denoise(z, alpha, sigma), want)


@pytest.mark.parametrize(
    "means, stds, match",
    [
        ([[float("nan"), 0.0]], [1.0], "means must be finite"),
        ([[float("inf"), 0.0]], [1.0], "means must be finite"),
        ([[0.0, 0.0]], [float("inf")], "stds must be positive and finite"),
    ],
)
def test_non_finite_means_and_stds_are_refused(means, stds, match):
    """They were accepted, and the denoiser and samples were NaN or inf."""
    with pytest.raises(ValueError, match=match):
        GaussianMixture(means, stds)


def test_model_refuses_an_unknown_prediction_when_made():
    """An unknown prediction was accepted, and raised only at the first model call, inside a sampling loop."""
    with pytest.raises(ValueError, match="unknown prediction type"):
        GaussianMixture.ring().model(__import__("fastflow").VP(), "nope")


def test_denoiser_is_the_posterior_mean_by_quadrature():
    """With components of different widths, E[x | z] weighs each by its evidence N(z; alpha mu, alpha^2 s^2 +
    sigma^2), normalization included (one component alone cannot show that): compared with the posterior mean
    integrated over a fine grid of x in float64."""
    mix = GaussianMixture([[-1.0], [1.5]], [0.2, 1.0], [0.3, 0.7])
    alpha, sigma = 0.7, 0.5
    z = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)[:, None]
    x = torch.linspace(-12.0, 12.0, 200001, dtype=torch.float64)
    components = zip([0.3, 0.7], [-1.0, 1.5], [0.2, 1.0], strict=True)  # the mixture's weights, means, stds
    prior = sum(w * torch.exp(-0.5 * ((x - m) / s) ** 2) / s for w, m, s in components)
    like = torch.exp(-0.5 * ((z - alpha * x) / sigma) ** 2)  # [9, len(x)]
    want = (like * prior * x).sum(1) / (like * prior).sum(1)
    torch.testing.assert_close(mix.denoise(z, alpha, sigma)[:, 0], want, rtol=1e-7, atol=1e-9)
