"""The one exception tree of the project.

Two branches matter to callers:

* ``RecoverableError``: this read, this upload or this frame failed, but the
  service should log it, count it and carry on (a corrupt frame, a sensor that
  did not answer in time, a broker that is down).
* ``FatalError``: carrying on would be wrong (an invalid configuration, a
  device that is not there at start). The service stops with a clear message.

``PayloadError`` is what the receiver raises for an upload it must reject for
good; it is recoverable for the receiver (it keeps running) but permanent for
that payload (it goes to the dead-letter table). ``StoreUnavailable`` is its
opposite: the store failed, not the payload, so nothing is rejected.
"""

from __future__ import annotations


class DatalabError(Exception):
    """Base of every error this project raises on purpose."""


class RecoverableError(DatalabError):
    """Log, count, carry on."""


class ReadError(RecoverableError):
    """A sensor read failed this time: timeout, corrupt frame, garbage on the port."""


class ChecksumError(ReadError):
    """A frame arrived whole but its checksum does not match: no value is taken from it."""


class FrameError(ReadError):
    """Bytes that do not form a valid frame (bad header, bad length, truncated)."""


class SensorTimeout(ReadError):
    """The sensor did not answer within its deadline."""


class BusError(ReadError):
    """An I2C or serial bus transaction failed (after retries)."""


class TransportError(RecoverableError):
    """The network or the broker failed; the uplink retries on its own."""


class PayloadError(RecoverableError):
    """An uploaded payload is malformed, of an unknown version or too large: rejected for good."""


class StoreUnavailable(RecoverableError):
    """The DataLab store cannot be reached or written now (down, locked, disk full): retry later."""


class FatalError(DatalabError):
    """Carrying on would be wrong; stop with a clear message."""


class ConfigError(FatalError):
    """An invalid configuration: names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config key '{key}': {problem}")


class ConfigInvalid(ConfigError):
    """Every error of one configuration document (edge/config_schema.py), not only the first."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        problem = first.problem if len(self.errors) == 1 else "; ".join(str(e) for e in self.errors)
        super().__init__(first.key, problem)
        if len(self.errors) > 1:  # not "config key 'a': config key 'a': ..."
            self.args = (f"{len(self.errors)} configuration errors: {problem}",)

    def __str__(self) -> str:
        return str(self.args[0])


class DeviceNotFound(FatalError):
    """A configured device is not present at start (and the driver cannot wait for it)."""


class StoreNotFound(FatalError):
    """A command that reads the DataLab store was given one that is not there (or not a store).

    Read commands never create a store (issue 17.3): they stop with this, one line, exit code 2.
    """


class StoreUnreachable(StoreNotFound):
    """A PostgreSQL store that does not answer (down, frozen, or a wrong URL): `stats` reports it
    as an outage (exit 1); the other read commands stop as for a missing store."""
