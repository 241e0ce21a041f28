"""What the service's sandbox lets a process do: open device nodes, connect to addresses.

Run inside the container, once as an ``ExecStartPre=`` of datalab-edge.service (so with
exactly the unit's user, DevicePolicy= and IPAddress*= cgroup programs) and once outside
it as the same user (the control). Prints one line ``PLATFORM-PROBE {json}`` with, per
attempt, "ok" or the errno name. Always exits 0: the agent must still start after it.
Stdlib only: it runs with the installed venv's python, or any python3.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def open_device(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError as exc:
        return _err(exc)
    os.close(fd)
    return "ok"


def connect(host: str, port: int, timeout_s: float = 3.0) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect((host, port))
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return _err(exc)
    finally:
        s.close()
    return "ok"


def send(host: str, port: int) -> str:
    # UDP: an IP egress filter's drop comes back from sendto() as EPERM at once (a TCP SYN
    # it drops is retried by the kernel until connect() times out).
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"\0", (host, port))
    except OSError as exc:
        return _err(exc)
    finally:
        s.close()
    return "ok"


def main(argv: list[str]) -> None:
    remote = argv[1] if len(argv) > 1 else "192.0.2.1"  # an address outside IPAddressAllow=
    out = {
        "user": os.geteuid(),
        "/dev/null": open_device("/dev/null"),  # always allowed (DevicePolicy=closed's basics)
        "/dev/net/tun": open_device("/dev/net/tun"),  # char 10:200, in no DeviceAllow= class
        "remote_tcp": connect(remote, 53),
        "remote_udp": send(remote, 53),
        "localhost": connect("127.0.0.1", 1),  # allowed: refused, not forbidden
    }
    print("PLATFORM-PROBE " + json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv)
