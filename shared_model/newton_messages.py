"""The Newton fit's messages (no Flower): what a site answers to a Newton
query for the linear head (:mod:`shared_model.posterior`). Keys are named here
and in :mod:`shared_model.messages` only; :mod:`wire.records` packs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.clinical import REGIMENS
from shared_model.messages import COUNT_KEYS, expert_group
from shared_model.reply_values import whole_count

GLM = "glm"  # the Newton query's and reply's arrays record
NEWTON_QUERY = "newton"  # its Flower message type is ``query.newton``


@dataclass(frozen=True)
class NewtonReply:
    """A site's answer to a Newton query: for each candidate prior's current
    coefficients, the sums of its training patients' negative log-likelihood
    gradient and Hessian and its log-likelihood, and the validation split's
    log-likelihood; plus the training features' sums and sums of squares (the
    pooled standardisation).

    Attributes:
        site: the site's name.
        n: training patients with an outcome; ``val_n``: validation ones.
        loglik, val_loglik: ``(K,)``.
        grad: ``(K, S)``; hess: ``(K, S, S)`` (``S = 4P``).
        feature_n: training patients in the moments; ``feature_sum``,
            ``feature_sq``: ``(F,)`` over the raw tumour features.
        regimens: training patients with an outcome per regimen (each
            expert's support).
        val_grad, val_hess: the validation patients' gradient and Hessian
            sums, ``(K, S)`` and ``(K, S, S)`` (the recalibration's Newton
            steps use them).
    """

    site: str
    n: int
    loglik: np.ndarray
    grad: np.ndarray
    hess: np.ndarray
    val_n: int
    val_loglik: np.ndarray
    feature_n: int
    feature_sum: np.ndarray
    feature_sq: np.ndarray
    regimens: Mapping[str, int] = field(default_factory=dict)
    val_grad: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    val_hess: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "grad": self.grad,
            "hess": self.hess,
            "loglik": self.loglik,
            "val-loglik": self.val_loglik,
            "val-grad": self.val_grad,
            "val-hess": self.val_hess,
            "feature-sum": self.feature_sum,
            "feature-sq": self.feature_sq,
        }

    def values(self) -> dict[str, int]:
        return {
            "n": self.n,
            "val-n": self.val_n,
            "feature-n": self.feature_n,
            **{
                COUNT_KEYS[expert_group(r)]: int(self.regimens.get(r, 0))
                for r in REGIMENS
            },
        }

    @classmethod
    def read(
        cls,
        site: str,
        arrays: Mapping[str, np.ndarray],
        values: Mapping[str, Any],
        *,
        candidates: int,
        size: int,
        features: int,
    ) -> NewtonReply:
        """Read an untrusted reply; ValueError says what is wrong (shapes,
        dtypes, counts, non-finite values)."""
        expect = {
            "grad": (candidates, size),
            "hess": (candidates, size, size),
            "loglik": (candidates,),
            "val-loglik": (candidates,),
            "val-grad": (candidates, size),
            "val-hess": (candidates, size, size),
            "feature-sum": (features,),
            "feature-sq": (features,),
        }
        counts = {"n", "val-n", "feature-n"} | {
            COUNT_KEYS[expert_group(r)] for r in REGIMENS
        }
        if set(arrays) != set(expect) or set(values) != counts:
            raise ValueError(
                f"a Newton reply holds the arrays {sorted(expect)} and the counts "
                f"{sorted(counts)}"
            )
        for key, shape in expect.items():
            a = arrays[key]
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.shape != shape:
                raise ValueError(f"`{key}` is not a float array of shape {shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"`{key}` holds NaN or infinite values")
        return cls(
            site,
            whole_count(values["n"], "n"),
            arrays["loglik"].astype(np.float64),
            arrays["grad"].astype(np.float64),
            arrays["hess"].astype(np.float64),
            whole_count(values["val-n"], "val-n"),
            arrays["val-loglik"].astype(np.float64),
            whole_count(values["feature-n"], "feature-n"),
            arrays["feature-sum"].astype(np.float64),
            arrays["feature-sq"].astype(np.float64),
            {r: whole_count(values[COUNT_KEYS[expert_group(r)]], r) for r in REGIMENS},
            arrays["val-grad"].astype(np.float64),
            arrays["val-hess"].astype(np.float64),
        )
