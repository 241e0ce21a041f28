"""Start a throwaway MQTT broker on a free loopback port (tests, the demo, benches).

Mosquitto when it is installed (the broker we deploy), otherwise amqtt, a
maintained pure-Python broker, so the demo runs anywhere Python does. The
broker is a child process, so tests can stop it or SIGKILL it to inject faults.

By default the broker is plain and anonymous. ``secure=SecureSetup(...)``
(Mosquitto only) runs the configuration we ship instead: the template and ACL
from receiver/broker/ with a throwaway CA, server certificate, accounts and
client certificates made by receiver/provision.py, every listener on its own
free loopback port. Then ``port`` is the vans' TLS password listener and
``secure_info`` has the other ports, the CA and the credentials.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.config import UplinkConfig
    from receiver.config import ReceiverConfig
    from receiver.provision import CertPair


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass(frozen=True)
class SecureSetup:
    """What a secure LocalBroker provisions (all throwaway, in its workdir)."""

    # Vans with a password account (password mode).
    devices: tuple[str, ...] = ("van-001", "van-002")
    # Vans with a client certificate (certificate mode).
    cert_devices: tuple[str, ...] = ()
    # Also a plain-TCP listener with the same accounts and ACL, for comparison.
    plain_listener: bool = False
    # Names in the server certificate: what the clients dial.
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    # How to write the password files: "auto" (mosquitto_passwd if installed), "python".
    passwd_backend: str = "auto"


@dataclass
class SecureInfo:
    """Where a secure LocalBroker listens and the credentials it accepts (tests only)."""

    conf_dir: Path
    ca_dir: Path
    device_port: int
    cert_port: int
    receiver_port: int
    plain_port: int | None
    passwords: dict[str, str] = field(default_factory=dict)  # user -> password
    client_certs: "dict[str, CertPair]" = field(default_factory=dict)  # device -> files

    @property
    def ca_file(self) -> str:
        return str(self.conf_dir / "ca.crt")


class LocalBroker:
    """``with LocalBroker() as b: ... b.port``; ``kill()``/``start()`` to inject outages."""

    def __init__(
        self,
        kind: str = "auto",
        port: int | None = None,
        *,
        persistence: bool = True,
        extra_config: str = "",
        workdir: str | Path | None = None,
        secure: SecureSetup | None = None,
    ) -> None:
        if kind == "auto":
            kind = "mosquitto" if mosquitto_path() else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise ValueError(f"unknown broker kind {kind!r}")
        if kind == "mosquitto" and not mosquitto_path():
            raise FileNotFoundError("mosquitto is not installed")
        if secure is not None and kind != "mosquitto":
            raise ValueError("secure mode needs Mosquitto (it runs the shipped Mosquitto config)")
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = extra_config
        self._tmp = tempfile.TemporaryDirectory(prefix="datalab-broker-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{kind}.log"
        self.secure = secure
        self.secure_info: SecureInfo | None = None

    # --- secure mode -----------------------------------------------------------

    def _provision(self) -> SecureInfo:
        """CA, server certificate, accounts, client certificates and ACL, once per broker."""
        from receiver import provision as pv

        assert self.secure is not None
        setup = self.secure
        info = SecureInfo(
            conf_dir=self.workdir / "conf",
            ca_dir=self.workdir / "ca",
            device_port=self.port,
            cert_port=free_port(),
            receiver_port=free_port(),
            plain_port=free_port() if setup.plain_listener else None,
        )
        pv.create_ca(info.ca_dir, name="DataLab test CA", days=2)
        pv.issue_server_cert(info.ca_dir, info.conf_dir, list(setup.server_names), days=2)
        pv.write_public(info.conf_dir / "ca.crt", pv.ca_paths(info.ca_dir).cert.read_bytes())
        pv.write_public(info.conf_dir / "acl", pv.ACL_FILE.read_bytes())
        for device in setup.devices:
            info.passwords[device] = pv.generate_password()
            pv.set_password(info.conf_dir / "devices.passwd", device, info.passwords[device],
                            backend=setup.passwd_backend)  # fmt: skip
        info.passwords[pv.RECEIVER_USER] = pv.generate_password()
        pv.set_password(info.conf_dir / "receivers.passwd", pv.RECEIVER_USER,
                        info.passwords[pv.RECEIVER_USER], backend=setup.passwd_backend)  # fmt: skip
        for device in setup.cert_devices:
            info.client_certs[device] = pv.issue_device_cert(
                info.ca_dir, self.workdir / "clients", device, days=2
            )
        return info

    def _secure_config(self, info: SecureInfo) -> str:
        from receiver import provision as pv

        text = pv.render_broker_config({
            "CONF_DIR": str(info.conf_dir),
            "DATA_DIR": str(self.workdir),
            "LOG_DEST": "stderr",  # unbuffered; start() sends it to log_path
            # As root, Mosquitto would switch to the "mosquitto" user, who cannot
            # read our 0600 files; as anyone else this line is ignored.
            "RUN_AS": getpass.getuser(),
            "DEVICE_BIND": self.host,
            "DEVICE_PORT": info.device_port,
            "DEVICE_CERT_PORT": info.cert_port,
            "RECEIVER_BIND": self.host,
            "RECEIVER_PORT": info.receiver_port,
        })  # fmt: skip
        if not self.persistence:
            text = text.replace("\npersistence true\n", "\npersistence false\n")
        if info.plain_port is not None:
            # Same accounts and ACL as the vans' TLS listener, only without TLS.
            text += (
                f"\nlistener {info.plain_port} {self.host}\nallow_anonymous false\n"
                f"password_file {info.conf_dir}/devices.passwd\nacl_file {info.conf_dir}/acl\n"
            )
        return text + "\n" + self.extra_config + "\n"

    def _ports(self) -> list[int]:
        info = self.secure_info
        if info is None:
            return [self.port]
        ports = [info.device_port, info.cert_port, info.receiver_port]
        return ports + ([info.plain_port] if info.plain_port is not None else [])

    def uplink_config(
        self, device: str, *, certificate: bool = False, **overrides: object
    ) -> "UplinkConfig":
        """A van's [uplink] for this secure broker: password mode, or certificate mode."""
        from edge.config import UplinkConfig

        info = self._require_secure()
        if certificate:
            pair = info.client_certs[device]
            cfg = UplinkConfig(host=self.host, port=info.cert_port, tls=True, ca_file=info.ca_file,
                               cert_file=str(pair.cert), key_file=str(pair.key))  # fmt: skip
        else:
            cfg = UplinkConfig(host=self.host, port=info.device_port, tls=True,
                               ca_file=info.ca_file, username=device,
                               password=info.passwords[device])  # fmt: skip
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def receiver_config(self, store: str, **overrides: object) -> "ReceiverConfig":
        """The receiver's config for this secure broker: its listener, TLS and account."""
        from receiver.config import ReceiverConfig
        from receiver.provision import RECEIVER_USER

        info = self._require_secure()
        cfg = ReceiverConfig(store=store, host=self.host, port=info.receiver_port, tls=True,
                             ca_file=info.ca_file, username=RECEIVER_USER,
                             password=info.passwords[RECEIVER_USER])  # fmt: skip
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def _require_secure(self) -> SecureInfo:
        if self.secure_info is None:
            raise RuntimeError("not a secure broker, or not started yet")
        return self.secure_info

    # --- process ---------------------------------------------------------------

    def _command(self) -> list[str]:
        if self.kind == "mosquitto" and self.secure is not None:
            if self.secure_info is None:
                self.workdir.mkdir(parents=True, exist_ok=True)
                self.secure_info = self._provision()
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self._secure_config(self.secure_info))
            return [mosquitto_path() or "mosquitto", "-c", str(conf)]
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            lines = [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                f"persistence {'true' if self.persistence else 'false'}",
                f"persistence_location {self.workdir}/",
                # Keep QoS 1 messages for offline persistent sessions (vans out of coverage).
                "max_queued_messages 100000",
                "max_inflight_messages 100",
                self.extra_config,
            ]
            conf.write_text("\n".join(lines) + "\n")
            return [mosquitto_path() or "mosquitto", "-c", str(conf)]
        return [sys.executable, "-m", "simulator.amqtt_broker", self.host, str(self.port)]

    def start(self) -> "LocalBroker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        command = self._command()  # secure mode provisions into workdir here
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        try:
            for port in self._ports():
                wait_for_port(self.host, port, 15.0)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"{self.kind} did not start; its log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
            ) from None
        return self

    def kill(self) -> None:
        """SIGKILL: the broker loses what it had not saved, like a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
