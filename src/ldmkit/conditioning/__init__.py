"""Conditions: the typed `Cond`, the Conditioner (dropout for guidance), frozen text encoders."""

from ldmkit.conditioning.cond import Cond, cat_conds
from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig

__all__ = ["Cond", "cat_conds", "Conditioner", "ConditionerConfig"]
