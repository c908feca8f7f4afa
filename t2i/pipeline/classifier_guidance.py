"""Classifier guidance at sampling time (Dhariwal & Nichol 2021, §4.2): the labels a prompt names, the gradient
∇_{x_t} log p_φ(y | x_t) taken under autograd inside the inference-mode pipeline, and the guide that shifts the
U-Net's prediction by it (t2i.diffusion.guidance.classifier_guidance) at every step of any sampler.

A prompt's label for a head is the one word of that head's vocabulary it names ("a large red circle": colour red,
shape circle). A head whose words the prompt names none of, or several of ("a red circle above a blue square"
names two colours), is left unguided for that prompt; a prompt that names no word of any head is an error.

Steps whose ᾱ_t is below MIN_GUIDED_ALPHA_BAR are left unguided. There x_t holds (almost) nothing of x_0, so the
true ∇ log p(y | x_t) is ≈ 0 (it shrinks as √ᾱ_t), while Algorithm 2 moves x̂_0 by s (1−ᾱ)/√ᾱ times the gradient: 2·10⁴
times it at t = 999 of the cosine schedule (ᾱ = 2.4·10⁻⁹), where samplers with trailing timesteps start. A trained
classifier's small but non-zero gradient there (|∇| ≈ 0.09 on the demo) threw x̂_0 off by ~10³ and ruined every
image (docs/samplers.md, "Classifier guidance").
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from t2i.diffusion.guidance import classifier_guidance
from t2i.diffusion.schedules import alpha_bar_from_sigma, scheduler_alphas_cumprod, sigma_from_alpha_bar
from t2i.errors import T2IError
from t2i.models.classifier import IGNORE_LABEL, NoisyLatentClassifier

# Below this ᾱ_t (signal-to-noise ratio ᾱ / (1 − ᾱ) about 10⁻⁴) a step is not guided: see the module docstring.
MIN_GUIDED_ALPHA_BAR = 1e-4
# (x_t, timestep, network output, ᾱ_t or None) -> the output shifted towards the prompts' labels.
Guide = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def prompt_labels(prompts: list[str], vocabularies: dict[str, list[str]]) -> torch.Tensor:
    """Labels (B, heads) of `prompts`: per head the index of the one vocabulary word named, else IGNORE_LABEL."""
    rows = []
    for prompt in prompts:
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        named = [[i for i, word in enumerate(vocabulary) if word in words] for vocabulary in vocabularies.values()]
        if not any(named):
            known = "; ".join(f"{name}: {', '.join(vocabulary)}" for name, vocabulary in vocabularies.items())
            raise T2IError(f"prompt {prompt!r} names no label the classifier knows ({known}); classifier guidance "
                           "needs at least one")
        rows.append([indices[0] if len(indices) == 1 else IGNORE_LABEL for indices in named])
    return torch.tensor(rows, dtype=torch.long)


def log_prob_gradient(classifier: NoisyLatentClassifier, xt: torch.Tensor, timestep: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """∇_{x_t} Σ_heads log p_φ(y_head | x_t, t) per item, in fp32; heads labelled IGNORE_LABEL are left out.

    Pipelines sample under torch.inference_mode, whose tensors autograd refuses; the inputs are cloned out of it.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = xt.detach().clone().float().requires_grad_(True)
        logits = classifier(x, timestep.detach().clone())
        labels = labels.clone().to(x.device)
        total = x.new_zeros(())
        for head, name in enumerate(classifier.label_names):
            target = labels[:, head]
            known = target != IGNORE_LABEL
            log_probs = logits[name].float().log_softmax(dim=-1)  # (B, classes)
            total = total + (log_probs.gather(1, target.clamp(min=0)[:, None])[:, 0] * known).sum()
        (gradient,) = torch.autograd.grad(total, x)
    return gradient


def classifier_guide(classifier: NoisyLatentClassifier, labels: torch.Tensor, scale: float,
                     scheduler_config: dict) -> Guide:
    """The guide for `labels` (B, heads) at scale s, for a U-Net trained on `scheduler_config`'s schedule."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    train_sigmas = sigma_from_alpha_bar(scheduler_alphas_cumprod(scheduler_config))

    def guide(xt: torch.Tensor, timestep: torch.Tensor, output: torch.Tensor,
              alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=xt.device).float().reshape(-1).expand(xt.shape[0])
        if alpha_bar is None:
            alpha_bar = _alpha_bar_at(timestep, train_sigmas)
        informative = torch.as_tensor(alpha_bar).reshape(-1) >= MIN_GUIDED_ALPHA_BAR
        if not informative.any():
            return output
        gradient = log_prob_gradient(classifier, xt, timestep, labels)
        gradient = gradient * informative.to(gradient).reshape(-1, *([1] * (gradient.ndim - 1)))
        return classifier_guidance(prediction, xt, output, gradient, alpha_bar, scale)

    return guide


def _alpha_bar_at(timestep: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ at a (fractional) training timestep, σ linear between the trained σ_t as diffusers' Euler samplers take
    it; exact at integer timesteps, which the other diffusers samplers use."""
    t = timestep.to(torch.float64).cpu().clamp(0, len(train_sigmas) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(train_sigmas) - 1)
    fraction = t - low
    sigma = train_sigmas[low] * (1 - fraction) + train_sigmas[high] * fraction
    # Zero-terminal SNR makes σ_999 infinite (∞ · 0 is NaN): ᾱ = 0 there, a step left unguided.
    return alpha_bar_from_sigma(sigma).nan_to_num(0.0).float().to(timestep.device)
