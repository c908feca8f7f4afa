"""The sampler names, as a plain tuple: the command line lists them without importing diffusers or torch.

`t2i.diffusion.samplers.SAMPLERS` maps each name to its scheduler; a test keeps the two equal.
"""

SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a", "heun", "unipc")
