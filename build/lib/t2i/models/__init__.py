"""Building and loading the networks: the VAE, the text encoders, the U-Net."""
