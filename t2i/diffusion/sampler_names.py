"""The sampler names, as a plain tuple: the command line lists them without importing diffusers or torch.

`t2i.diffusion.samplers.ALL_SAMPLERS` lists the same names from the registries; a test keeps the two equal.
"""

SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_sde", "euler", "euler_a", "heun", "heun_karras",
                                  "lms", "unipc", "pc", "annealed_langevin", "pf_ode")
