"""Data path for pre-training: the MLM collator and sequence packing (import-light: torch and numpy only)."""
from fastbert.data.collator import MLMCollator
from fastbert.data.packing import PackingPlan, plan_packing, plan_packing_reference

__all__ = ["MLMCollator", "PackingPlan", "plan_packing", "plan_packing_reference"]
