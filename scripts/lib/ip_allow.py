"""The van unit's address allow list, from agent.toml (run by scripts/install-pi).

The shipped unit denies every address but loopback (IPAddressDeny=any, IPAddressAllow=localhost).
This prints the drop-in that lets the agent reach what its configuration names: the broker
(``uplink.host``) and a sensor's network ``host`` (gpsd elsewhere). An address literal goes in
as it is; a DNS name is resolved now, and then the resolvers in resolv.conf are allowed too,
since the agent resolves the name again at every connect. Both are a snapshot: a changed broker
address or DNS server needs install-pi again (docs/install.md, "Network allow list").
``uplink.host`` is local-only (edge/remote_policy.py), so only a technician's edit changes it.

    python3 ip_allow.py AGENT_TOML RESOLV_CONF [--off]   # drop-in on stdout; exit 1 + reason
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import tomllib
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def hosts(config: dict) -> list[str]:
    """Every host the agent connects to, as the configuration names them."""
    out = [str(config.get("uplink", {}).get("host", "localhost"))]
    for sensor in (config.get("sensors") or {}).values():
        if isinstance(sensor, dict) and isinstance(sensor.get("host"), str):
            out.append(sensor["host"])
    return out


def nameservers(resolv: str) -> list[str]:
    found = []
    for line in resolv.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return found


def resolve(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise LookupError(f"cannot resolve {name!r} ({exc})") from exc
    return [str(info[4][0]).split("%")[0] for info in infos]


def allowed(config: dict, resolv: str) -> tuple[list[str], list[str]]:
    """(addresses to allow, DNS names that were resolved for them)."""
    addrs: list[str] = []
    names: list[str] = []
    for host in hosts(config):
        if host.lower() in LOOPBACK_NAMES:
            continue  # the unit allows loopback already
        try:
            addrs.append(str(ipaddress.ip_address(host)))
        except ValueError:
            names.append(host)
            addrs.extend(resolve(host))
    if names:
        addrs.extend(nameservers(resolv))
    loopback = [a for a in addrs if ipaddress.ip_address(a).is_loopback]
    return sorted(set(addrs) - set(loopback), key=lambda a: (":" in a, a)), names


def dropin(config: dict, resolv: str, off: bool = False) -> str:
    head = "# Written by scripts/install-pi from /etc/datalab-edge/agent.toml: run it again after\n" \
           "# changing uplink.host (docs/install.md, \"Network allow list\").\n[Service]\n"
    if off:
        # An empty assignment clears the unit's IPAddressDeny=any: no address filter at all.
        return head + "# install-pi --no-ip-filter: the broker's address changes, so no filter.\nIPAddressDeny=\n"
    addrs, names = allowed(config, resolv)
    note = f"# resolved now: {', '.join(names)} (and the resolvers in resolv.conf)\n" if names else ""
    return head + note + "".join(f"IPAddressAllow={a}\n" for a in addrs)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--off"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        config = tomllib.loads(Path(argv[0]).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1
    resolv_path = Path(argv[1])
    resolv = resolv_path.read_text() if resolv_path.exists() else ""
    try:
        sys.stdout.write(dropin(config, resolv, off=len(argv) == 3))
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
