"""The One-Euro filter (Casiez, Roussel and Vogel, CHI 2012) for keypoints of a tracked hand.

A low-pass filter whose cut-off rises with the speed of the signal: still hands are smoothed hard
(no jitter), moving hands lightly (little lag), which a moving average or a fixed Kalman filter
cannot do at once. Values are divided by ``scale`` before filtering (the hand's size), so one set
of parameters fits near and far hands, as in MediaPipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["OneEuroFilter", "OneEuroParams"]


@dataclass(frozen=True)
class OneEuroParams:
    """Filter settings (MediaPipe's defaults for normalised landmarks).

    Attributes:
        min_cutoff: cut-off frequency of a still signal, Hz (lower: smoother, more lag).
        beta: how fast the cut-off grows with speed (higher: less lag when moving).
        d_cutoff: cut-off of the speed estimate, Hz.
    """

    min_cutoff: float = 0.1
    beta: float = 40.0
    d_cutoff: float = 1.0

    def check(self) -> None:
        if not (self.min_cutoff > 0 and self.d_cutoff > 0 and self.beta >= 0):
            raise ValueError("One-Euro filter needs min_cutoff > 0, d_cutoff > 0 and beta >= 0")


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over an array of any fixed shape (module docstring)."""

    def __init__(self, params: OneEuroParams | None = None) -> None:
        self.params = params or OneEuroParams()
        self.params.check()
        self.reset()

    def reset(self) -> None:
        """Forget the history (a lost track)."""
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        """The filtered value of sample ``x`` taken at time ``t`` (seconds)."""
        x = np.asarray(x, np.float64)
        scale = max(float(scale), 1e-9)
        xn = x / scale
        if self._x is None or self._t is None or t <= self._t or self._x.shape != xn.shape:
            self._x, self._dx, self._t = xn, np.zeros_like(xn), float(t)
            return x.copy()
        dt = float(t) - self._t
        p = self.params
        dx = (xn - self._x) / dt
        self._dx = self._dx + _alpha(p.d_cutoff, dt) * (dx - self._dx)
        cutoff = p.min_cutoff + p.beta * np.abs(self._dx)
        self._x = self._x + _alpha(cutoff, dt) * (xn - self._x)
        self._t = float(t)
        return self._x * scale
