"""The tilt fit's regression (`infalign.study.tilt_fit`; docs/sweeps.md, Tilt fit, defines each statistic): a policy's
log-ratio on reference samples regressed on Phi(C)/beta within prompts, the s.e. clustered by prompt. Plain numpy.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_slope"]

_LINEAR = 1e-10  # Phi's part not linear in C, relative to Phi's variance, below which the shape is undefined


# ------------------------------------------------------------------------------------------------ the regression
def _demean(x: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    sums = np.bincount(groups, weights=x, minlength=count)
    sizes = np.bincount(groups, minlength=count)
    return x - (sums / np.maximum(sizes, 1))[groups]


def _ols(x: np.ndarray, y: np.ndarray, groups: np.ndarray, count: int, dof: int):
    """Coefficients of y on the columns of x (no intercept: both demeaned), their clustered and simple s.e."""
    xtx = x.T @ x
    inv = np.linalg.inv(xtx)
    coef = inv @ (x.T @ y)
    resid = y - x @ coef
    scores = np.zeros((count, x.shape[1]))
    np.add.at(scores, groups, x * resid[:, None])
    used = int((np.bincount(groups, minlength=count) > 0).sum())
    n, k = len(y), x.shape[1]
    if used > 1 and n > k:
        correction = used / (used - 1) * (n - 1) / max(n - k, 1)
        clustered = np.sqrt(np.maximum(np.diag(inv @ (scores.T @ scores) @ inv) * correction, 0.0))
    else:
        clustered = np.full(k, np.nan)
    sigma2 = float(resid @ resid) / dof if dof > 0 else np.nan
    simple = np.sqrt(np.maximum(np.diag(inv) * sigma2, 0.0))
    return coef, clustered, simple, resid


def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def fit_slope(logratio, phi_over_beta, prompt_ids, c_over_beta=None) -> dict:
    """The within-prompt regression of `logratio` (log pi - log pi_ref of each sample) on `phi_over_beta`
    (Phi(C)/beta), samples grouped by `prompt_ids` (any hashable labels, one per sample); with `c_over_beta`
    (C/beta) also the shape statistic. Pure numpy: the module docstring defines every number returned (None where
    undefined: no sample varies in Phi(C) within its prompt, or a transform linear in C for the shape)."""
    y = np.asarray(logratio, dtype=np.float64).ravel()
    f = np.asarray(phi_over_beta, dtype=np.float64).ravel()
    labels = list(np.asarray(prompt_ids, dtype=object).ravel())
    if not (len(y) == len(f) == len(labels)) or (c_over_beta is not None and len(np.ravel(c_over_beta)) != len(y)):
        raise ValueError(f"fit_slope: logratio, phi_over_beta, prompt_ids (and c_over_beta) need one value per "
                         f"sample, got {len(y)}, {len(f)}, {len(labels)}")
    if not (np.isfinite(y).all() and np.isfinite(f).all()):
        raise ValueError("fit_slope: logratio and phi_over_beta must be finite")
    index: dict = {}
    groups = np.array([index.setdefault(p, len(index)) for p in labels], dtype=np.int64)
    count = len(index)
    yd, fd = _demean(y, groups, count), _demean(f, groups, count)
    sxx = float(fd @ fd)
    out: dict = {"samples": len(y), "prompts": count, "slope": None, "slope_se": None, "slope_se_simple": None,
                 "r2": None, "shape": None, "shape_se": None, "shape_ratio": None, "prompt_slope_median": None,
                 "prompt_slope_q25": None, "prompt_slope_q75": None, "logratio_mean": _number(y.mean()) if len(y)
                 else None, "per_prompt": []}
    # per prompt
    sxy_p = np.bincount(groups, weights=fd * yd, minlength=count)
    sxx_p = np.bincount(groups, weights=fd * fd, minlength=count)
    sizes = np.bincount(groups, minlength=count)
    scale = np.bincount(groups, weights=f * f, minlength=count)
    varies = sxx_p > 1e-12 * np.maximum(scale, 1e-300)
    per = np.where(varies, sxy_p / np.where(varies, sxx_p, 1.0), np.nan)
    out["per_prompt"] = [{"prompt_id": str(p), "samples": int(sizes[i]), "slope": _number(per[i])}
                         for p, i in index.items()]
    if varies.any():
        q25, median, q75 = np.percentile(per[varies], [25, 50, 75])
        out.update(prompt_slope_median=float(median), prompt_slope_q25=float(q25), prompt_slope_q75=float(q75))
    if sxx <= 0 or not varies.any():
        return out
    coef, clustered, simple, resid = _ols(fd[:, None], yd, groups, count, dof=len(y) - count - 1)
    syy = float(yd @ yd)
    out.update(slope=float(coef[0]), slope_se=_number(clustered[0]), slope_se_simple=_number(simple[0]),
               r2=_number(1.0 - float(resid @ resid) / syy) if syy > 0 else None)
    if c_over_beta is not None:
        cd = _demean(np.asarray(c_over_beta, dtype=np.float64).ravel(), groups, count)
        # Phi's part not linear in C: without one, Phi and C are the same regressor (the identity)
        nonlinear = fd - cd * (float(cd @ fd) / float(cd @ cd)) if float(cd @ cd) > 0 else fd
        if float(nonlinear @ nonlinear) > _LINEAR * sxx:
            coef2, clustered2, _, _ = _ols(np.stack([fd, cd], axis=1), yd, groups, count, dof=len(y) - count - 2)
            out.update(shape=float(coef2[0]), shape_se=_number(clustered2[0]))
            out["shape_ratio"] = _number(coef2[0] / coef[0]) if coef[0] != 0 else None
    return out
