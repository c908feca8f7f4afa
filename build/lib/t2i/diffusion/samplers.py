"""Samplers by name, each a diffusers scheduler built from the pipeline's saved scheduler config."""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from t2i.errors import T2IError

# name -> (scheduler class, settings that define the method on top of the shared noise schedule)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise T2IError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def make_scheduler(name: str, scheduler_config: dict) -> SchedulerMixin:
    """A fresh scheduler of sampler `name` over the noise schedule in `scheduler_config` (any diffusers one)."""
    check_sampler(name)
    cls, settings = SAMPLERS[name]
    return cls.from_config({**scheduler_config, **settings})
