"""When sparse training changes its masks and by how much: the schedules of the papers, as pure functions."""

from __future__ import annotations

import math


def cosine_fraction(step: int, alpha: float, end: int) -> float:
    """RigL's update fraction f_t = alpha/2 * (1 + cos(pi * t / T_end)) (Evci et al. 2020, eq. 1); 0 after T_end."""
    if end <= 0 or step >= end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / end))


def constant_fraction(step: int, alpha: float, end: int) -> float:
    """SET's update fraction: the same zeta at every update until T_end."""
    return alpha if 0 <= step < end else 0.0


def cubic_sparsity(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta's gradual schedule s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3, with t_0 + n dt = end.

    Before ``begin`` the sparsity is ``initial``; from ``end`` on it is ``final``.
    """
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1 - progress) ** 3


def on_interval(step: int, interval: int, begin: int, end: int) -> bool:
    """True at steps begin + k * interval (k >= 1) up to and including ``end``: when a mask update falls due."""
    return interval > 0 and begin < step <= end and (step - begin) % interval == 0
