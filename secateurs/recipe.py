"""Old home of :class:`Recipe` (now :mod:`secateurs.oneshot.recipe`) and :class:`Calibration`
(:mod:`secateurs.data.calibration`); kept so that ``from secateurs.recipe import Recipe`` goes on working."""

from secateurs.data.calibration import Calibration
from secateurs.oneshot.recipe import Recipe

__all__ = ["Calibration", "Recipe"]
