"""The topics of remote configuration: where the DataLab sends a van its configuration, and
where the van answers. Both ends (edge/remote.py, receiver/device_config.py) must agree.
"""

from __future__ import annotations


def config_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/config"


def config_ack_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/config/ack"
