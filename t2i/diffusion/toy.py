"""A Gaussian mixture whose noised density, score and denoiser are known in closed form at every noise level.

Adding noise of scale σ to x_0 ~ Σ_k w_k N(μ_k, Σ_k) gives x = x_0 + σ n ~ Σ_k w_k N(μ_k, Σ_k + σ² I), so the
exact score and the exact denoiser E[x_0 | x] (Tweedie's formula, Efron 2011) are available to test samplers and
likelihoods against a known answer, with no network in the way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Weights (K,), means (K, D) and covariances (K, D, D), in float64."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        """E[x_0] = Σ w_k μ_k."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x_0] = Σ w_k (Σ_k + μ_k μ_kᵀ) − E[x_0] E[x_0]ᵀ."""
        second = torch.einsum("k,kij->ij", self.weights,
                              self.covariances + self.means[:, :, None] * self.means[:, None, :])
        mean = self.mean()
        return second - torch.outer(mean, mean)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` draws of x_0 (count, D)."""
        component = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)[component]
        white = torch.randn(count, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[component] + (chol @ white).squeeze(-1)

    def _component_log_densities(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log w_k N(x; μ_k, Σ_k + σ² I) (B, K) and the precision-weighted offsets (Σ_k + σ² I)⁻¹ (x − μ_k) (B, K, D)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        # One (K, D, D) inverse when the batch shares σ, as it does inside samplers; else one per item.
        levels = sigma[:1] if bool((sigma == sigma[0]).all()) else sigma
        cov = self.covariances[None] + (levels**2)[:, None, None, None] * torch.eye(self.dim, dtype=torch.float64)
        precision, log_det = torch.linalg.inv(cov), torch.linalg.slogdet(cov).logabsdet       # (b, K, D, D), (b, K)
        offset = x.to(torch.float64)[:, None, :] - self.means[None]                            # (B, K, D)
        solved = torch.einsum("bkij,bkj->bki", precision.expand(x.shape[0], -1, -1, -1), offset)
        mahalanobis = (offset * solved).sum(-1)
        log_normal = -0.5 * (mahalanobis + log_det + self.dim * math.log(2 * math.pi))
        return self.weights.log()[None] + log_normal, solved

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log p_σ(x) (B,) of the mixture convolved with N(0, σ² I)."""
        log_joint, _ = self._component_log_densities(x, torch.as_tensor(sigma))
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """p(k | x) at noise level σ: (B, K)."""
        log_joint, _ = self._component_log_densities(x, torch.as_tensor(sigma))
        return log_joint.softmax(dim=1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """∇ log p_σ(x) = −Σ_k p(k | x) (Σ_k + σ² I)⁻¹ (x − μ_k)."""
        log_joint, solved = self._component_log_densities(x, torch.as_tensor(sigma))
        return -(log_joint.softmax(dim=1)[:, :, None] * solved).sum(1).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x_0 | x] = x + σ² ∇ log p_σ(x) (Tweedie's formula): the ideal denoiser D(x, σ)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        return x + sigma[:, None] ** 2 * self.score(x, sigma)


def three_mode_mixture() -> GaussianMixture:
    """The test mixture: three unequal, anisotropic modes in 2-D, away from the origin."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    means = torch.tensor([[-2.0, 3.0], [2.5, 1.0], [0.5, -2.5]], dtype=torch.float64)
    covariances = torch.tensor([[[0.30, 0.10], [0.10, 0.20]],
                                [[0.50, -0.20], [-0.20, 0.40]],
                                [[0.25, 0.00], [0.00, 0.60]]], dtype=torch.float64)
    return GaussianMixture(weights, means, covariances)
