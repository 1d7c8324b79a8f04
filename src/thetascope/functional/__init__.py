"""thetascope.functional: pure-torch math (no Lightning, no other thetascope package).

* :mod:`.theta`: balanced-mass factor bracket, softmax Jacobian norm, attention entropy.
* :mod:`.norms`: block-infinity/RMS norms and token-norm statistics.
* :mod:`.spectral`: batched power iteration with persistent vectors.
* :mod:`.sensitivity`: projection product, sensitivity proxy, MHA Lipschitz bound, path-length scale.
* :mod:`.gradients`: per-layer gradient norms and gradient-flow pathology statistics.
* :mod:`.spikes`: on-device robust spike detection.
* :mod:`.apjn`: averaged partial Jacobian norm.
* :mod:`.depth_fit`: power-law / stretched-exponential fits of an APJN depth profile and the verdict.
"""

from thetascope.functional.apjn import (
    apjn_profile,
    apjn_with_stderr,
    averaged_partial_jacobian_norm,
    averaged_partial_jacobian_norm_exact,
)
from thetascope.functional.depth_fit import DepthFit, fit_depth_profile
from thetascope.functional.gradients import (
    grad_norms_by_group,
    gradient_pathology,
    group_parameters_by_layer,
    layer_index_of,
)
from thetascope.functional.norms import block_rms_norm, count_nonfinite_tokens, max_token_norm
from thetascope.functional.sensitivity import (
    mha_lipschitz_bound,
    path_length_scale,
    projection_norm_product,
    sensitivity_proxy,
)
from thetascope.functional.spectral import (
    DEFAULT_INIT_ITERS,
    DEFAULT_N_VECTORS,
    DEFAULT_POWER_ITERS,
    SpectralNormEstimator,
    head_slices,
    power_iteration,
)
from thetascope.functional.spikes import SpikeDetector
from thetascope.functional.theta import (
    ThetaBounds,
    attention_entropy,
    balanced_mass_exhaustive,
    balanced_mass_factor,
    balanced_mass_greedy,
    softmax_jacobian_norm,
)

__all__ = [
    "DEFAULT_INIT_ITERS",
    "DEFAULT_N_VECTORS",
    "DEFAULT_POWER_ITERS",
    "SpectralNormEstimator",
    "SpikeDetector",
    "ThetaBounds",
    "attention_entropy",
    "averaged_partial_jacobian_norm",
    "averaged_partial_jacobian_norm_exact",
    "balanced_mass_exhaustive",
    "balanced_mass_factor",
    "balanced_mass_greedy",
    "block_rms_norm",
    "count_nonfinite_tokens",
    "grad_norms_by_group",
    "gradient_pathology",
    "group_parameters_by_layer",
    "head_slices",
    "layer_index_of",
    "max_token_norm",
    "mha_lipschitz_bound",
    "path_length_scale",
    "power_iteration",
    "projection_norm_product",
    "sensitivity_proxy",
    "softmax_jacobian_norm",
]

__all__ += ["DepthFit", "apjn_profile", "apjn_with_stderr", "fit_depth_profile"]
