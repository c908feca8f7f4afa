"""An adaptive Runge–Kutta solver (Dormand & Prince 1980, RK5(4)7M) with its own step size for every batch item.

Written here rather than taken from scipy (which Song et al. 2021 call as `solve_ivp(method="RK45")`) so that it
runs on batched torch tensors on any device, and so that each item's steps depend on that item alone: an image does
not change with the images that share its batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from t2i.errors import T2IError

# The Butcher tableau of Dormand–Prince 5(4) (Hairer, Nørsett & Wanner, "Solving ODEs I", table II.5.2).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_ERROR = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))

# Step-size control (Hairer et al., §II.4): a safety factor and limits on how fast the step may shrink or grow.
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0
FIRST_STEP_FRACTION = 0.05  # the first trial step, as a fraction of the interval; control corrects it at once
MAX_STEPS = 10_000

OdeFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(t (B,), y (B, ...)) -> dy/dt


def _per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (like.ndim - 1)).to(like.dtype)


def solve_ode(f: OdeFunction, y0: torch.Tensor, t0: torch.Tensor | float, t1: torch.Tensor | float,
              rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """y(t1) for dy/dt = f(t, y), y(t0) = y0, each item (dim 0) stepped with its own error-controlled step.

    Returns y(t1) and the number of evaluations of f each item needed (B,). The error of a step is the RMS over the
    item of (y5 − y4) / (atol + rtol · max(|y|, |y_new|)), accepted when at most 1.
    """
    batch = y0.shape[0]
    t = torch.as_tensor(t0, dtype=torch.float64).expand(batch).clone()
    end = torch.as_tensor(t1, dtype=torch.float64).expand(batch).clone()
    direction = torch.sign(end - t)
    h = (end - t).abs() * FIRST_STEP_FRACTION
    y = y0.clone()
    k1 = f(t, y)
    evaluations = torch.ones(batch, dtype=torch.long)
    for _ in range(MAX_STEPS):
        running = t != end
        if not running.any():
            return y, evaluations
        remaining = (end - t).abs()
        last = h >= remaining
        h = torch.where(running, torch.minimum(h, remaining), torch.zeros_like(h))
        step = _per_item(direction * h, y)
        stages = [k1]
        for c, row in zip(_C[1:], _A[1:]):
            increment = sum(a * k for a, k in zip(row, stages) if a != 0.0)
            stages.append(f(t + c * direction * h, y + step * increment))
        y_new = y + step * sum(b * k for b, k in zip(_B5, stages) if b != 0.0)
        error_estimate = step * sum(e * k for e, k in zip(_ERROR, stages) if e != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        error = (error_estimate / scale).pow(2).flatten(1).mean(1).sqrt().to(torch.float64)
        accepted = running & (error <= 1.0)
        evaluations += 6 * running.long()
        keep = _per_item(accepted, y).bool()
        y = torch.where(keep, y_new, y)
        k1 = torch.where(keep, stages[-1], k1)  # first-same-as-last: stage 7 is f at the accepted point
        t = torch.where(accepted, torch.where(last, end, t + direction * h), t)
        factor = (SAFETY * error.clamp(min=1e-10) ** -0.2).clamp(MIN_FACTOR, MAX_FACTOR)
        h = h * torch.where(accepted, factor, factor.clamp(max=1.0))
    raise T2IError(f"the ODE solver did not reach the end in {MAX_STEPS} steps; loosen its tolerances (rtol {rtol}, "
                   f"atol {atol})")
