"""Diffusion math as pure functions over tensors: schedules, parameterisations, losses, guidance, samplers."""
