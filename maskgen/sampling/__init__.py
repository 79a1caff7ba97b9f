"""Samplers: MaskGIT iterative decoding for MAGE (`maskgit`)."""
from .maskgit import (UNKNOWN, MaskGITScheduler, MaskGITStepOutput, box_region, generate, inpaint_tokens,
                      token_region)

__all__ = ["UNKNOWN", "MaskGITScheduler", "MaskGITStepOutput", "generate", "inpaint_tokens", "token_region",
           "box_region"]
