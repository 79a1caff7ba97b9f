"""Training losses shared by methods: perceptual distances and adversarial (GAN) terms."""
from .adversarial import (DISCRIMINATORS, GAN_LOSSES, PatchDiscriminator, StyleGANDiscriminator,  # noqa: F401
                          adaptive_weight, build_discriminator, d_loss, g_loss, r1_penalty)
from .perceptual import NETWORKS as PERCEPTUAL_NETWORKS, PerceptualLoss  # noqa: F401
