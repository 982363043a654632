"""Pixel conversion between images and the VAE's tensors, on any torch device, bit-identical to diffusers."""
