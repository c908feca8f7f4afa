"""Training: one shared loop and small stages (vae, clip, unet)."""
