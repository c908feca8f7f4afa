"""The sampler names, as a plain tuple: the command line lists them without importing diffusers or torch.

`t2i.diffusion.samplers.ALL_SAMPLERS` lists the same names from the registries; a test keeps the two equal.
"""

SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_sde", "euler", "euler_a", "heun", "heun_karras",
                                  "lms", "unipc", "pc", "annealed_langevin", "pf_ode")
# The diffusers schedulers alone: what the SR stage (t2i upscale) and an exported diffusers folder can use.
SCHEDULER_SAMPLER_NAMES: tuple[str, ...] = SAMPLER_NAMES[:-3]
