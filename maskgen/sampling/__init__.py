"""Samplers behind one contract (`base.Sampler`, registered in `maskgen.registry.SAMPLERS`); importing this
package registers the built-in ones: `maskgit` (MaskGIT iterative decoding for MAGE) and `ddim` (DDIM with
classifier-free guidance for UMD)."""
from .base import (Sampler, add_sampler_arguments, check_can_generate, sampler_for,  # noqa: F401
                   sampler_options_from_args, samples_to_images)
from .ddim import DDIMOptions, DDIMScheduler, DDIMStepOutput, ddim_grid  # noqa: F401
from .maskgit import (UNKNOWN, MaskGITOptions, MaskGITScheduler, MaskGITStepOutput, generate,  # noqa: F401
                      inpaint_tokens, token_region)

__all__ = ["Sampler", "check_can_generate", "sampler_for", "samples_to_images", "add_sampler_arguments",
           "sampler_options_from_args", "DDIMOptions", "DDIMScheduler", "DDIMStepOutput", "ddim_grid",
           "UNKNOWN", "MaskGITOptions", "MaskGITScheduler", "MaskGITStepOutput", "generate", "inpaint_tokens",
           "token_region"]
