"""A broker given by URL for ``datalab-sim fleet --receiver-url`` (a receiver of your own).

``mqtt://host[:1883]`` or ``mqtts://[user[:password]@]host[:8883]``; the credentials, if any,
become every simulated van's ``[uplink]`` account (a broker with one account per van and an
ACL per device, like receiver/broker/, needs one identity per van instead:
simulator/van_accounts.py, ``--van-ca-dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""  # secret: never printed (see shown)

    @property
    def shown(self) -> str:
        """The URL fit for a terminal or a log: no password."""
        user = f"{self.username}:***@" if self.password else (f"{self.username}@" if self.username else "")
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerTarget:
    """``url`` as a :class:`BrokerTarget`; ``ValueError`` naming what is wrong (never the password)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"a broker URL starts with mqtt:// or mqtts://, not {scheme or 'nothing'}://")
    if not parts.hostname:
        raise ValueError("the broker URL names no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError("the broker URL's port is not a number from 1 to 65535") from None
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("a broker URL is mqtt[s]://[user[:password]@]host[:port], with no path or query")
    return BrokerTarget(parts.hostname, port, scheme == "mqtts", unquote(parts.username or ""),
                        unquote(parts.password or ""))
