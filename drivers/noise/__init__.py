"""Noise: an A-weighted sound level meter for an I2S MEMS microphone.

Audio never leaves memory: blocks are processed into levels and dropped; nothing is
written to disk, logged or sent.  Modules:

* :mod:`.weighting` — IEC 61672-1 A-weighting designed for the sample rate, fast IIR;
* :mod:`.levels` — :class:`LevelMeter` (LAeq, LAFmax/min, LA10/50/90, flags);
* :mod:`.capture` — :class:`MicrophoneDriver` (SensorDriver) and :class:`AlsaSource`.
"""

from .capture import AlsaSource, BlockSource, MicrophoneDriver
from .levels import LevelMeter, MeterConfig, MinuteLevels, SecondLevels
from .weighting import a_weighting_db, design_a_weighting

__all__ = [
    "AlsaSource",
    "BlockSource",
    "MicrophoneDriver",
    "LevelMeter",
    "MeterConfig",
    "MinuteLevels",
    "SecondLevels",
    "a_weighting_db",
    "design_a_weighting",
]
