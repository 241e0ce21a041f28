"""The receiver's check of a calibration record: the rules live in core/calibration_rules.py.

They moved there so the van runs the same check (``CalibrationStore.add`` and the buffer's
commit check) without importing the receiver; this module keeps the receiver's API.
"""

from core.calibration_rules import MAX_ABS_NUMBER, MAX_ABS_TIME_S, MIN_ABS_SCALE, check_record

__all__ = ["MAX_ABS_NUMBER", "MAX_ABS_TIME_S", "MIN_ABS_SCALE", "check_record"]
