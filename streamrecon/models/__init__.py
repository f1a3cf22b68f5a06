"""CUT3R model, heads, LocalMemory and the state update rule."""

from .cut3r import Cut3r
from .state_update import CUT3R_RULE, UpdateRule, advance_state

__all__ = ["Cut3r", "CUT3R_RULE", "UpdateRule", "advance_state"]
