"""Closed-form InfAlign analysis (math page, section 3): tilted densities, KL, win rates, optimal transforms.

`at_m` and `cache_averaged_summary` (finite_m.py) carry the analysis over to the M-sample calibration runs use.

Run `python -m infalign.theory transform=bon_exp transform.t=4 beta=0.1 n=4` for one point (the last line
of standard output is a JSON object), or `... mode=curve` for win-rate-vs-KL curves (CSV + PNG).
"""

from infalign.theory.core import TiltedDensity, analyze, default_grid, inference_win_rate, kl, tilted_density
from infalign.theory.finite_m import CalibratedAtM, at_m, cache_averaged_summary
from infalign.theory.solve import TabulatedPhi, best_t, beta_for_kl, optimal_density, optimal_transform, win_rate_curves

__all__ = ["CalibratedAtM", "TabulatedPhi", "TiltedDensity", "analyze", "at_m", "best_t", "beta_for_kl",
           "cache_averaged_summary", "default_grid", "inference_win_rate", "kl", "optimal_density", "optimal_transform",
           "tilted_density", "win_rate_curves"]
