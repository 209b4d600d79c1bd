"""The diffusion process: noise schedules, parameterisations (eps / v / x0), the training
objective, classifier-free guidance and samplers. Nothing here knows about networks or pixels:
a model is a function model_fn(z_t, t) -> raw prediction, wrapped in a `Denoiser`.

    schedule = make_schedule("scaled_linear")
    denoiser = Denoiser(classifier_free_guidance(cond_fn, uncond_fn, 7.5), schedule, "eps")
    z0 = get_sampler("dpmpp_2m")(denoiser, z_T, make_timesteps(schedule, 25), generator=g)
"""

from ldmkit.diffusion.guidance import batched_classifier_free_guidance, classifier_free_guidance, rescale_guidance
from ldmkit.diffusion.objective import WEIGHTINGS, DiffusionObjective, ObjectiveTerms
from ldmkit.diffusion.parameterization import (
    PREDICTION_TYPES,
    Denoiser,
    canonical_prediction_type,
    consistency_scalings,
    target,
    to_x0_eps,
    v_target,
)
from ldmkit.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_unipc,
    sample_euler,
    sample_euler_ancestral,
    sample_lcm,
)
from ldmkit.diffusion.schedules import (
    LCM_GRID_STEPS,
    SCHEDULE_KINDS,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    expand_like,
    lcm_timesteps,
    make_schedule,
    make_sigma_steps,
    make_timesteps,
    q_sample,
    randn_like,
    rescale_to_zero_terminal_snr,
    sampler_timesteps,
)

__all__ = [
    "LCM_GRID_STEPS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "TIMESTEP_SPACINGS",
    "WEIGHTINGS",
    "Denoiser",
    "DiffusionObjective",
    "NoiseSchedule",
    "ObjectiveTerms",
    "batched_classifier_free_guidance",
    "canonical_prediction_type",
    "classifier_free_guidance",
    "consistency_scalings",
    "expand_like",
    "get_sampler",
    "lcm_timesteps",
    "make_schedule",
    "make_sigma_steps",
    "make_timesteps",
    "q_sample",
    "randn_like",
    "rescale_guidance",
    "rescale_to_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_unipc",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_lcm",
    "sampler_timesteps",
    "target",
    "to_x0_eps",
    "v_target",
]
