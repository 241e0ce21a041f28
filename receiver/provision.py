"""Provision the broker side of a fleet: CA, certificates, Mosquitto accounts, agent config.

A small library plus the ``provision`` click group (wired into
``datalab-receiver``). Certificates are made with the ``openssl`` command line:
the project does not depend on the ``cryptography`` package, and ``openssl`` is
on every Debian and Raspberry Pi OS host. Keys are ECDSA P-256 (fast TLS
handshakes on a Pi, supported by Mosquitto and Python's ssl).

Secrets (private keys, passwords, files that hold them) are written with mode
0600 from the first byte, are never logged or echoed, and never appear on a
command line (where any local user could read them in /proc/<pid>/cmdline).

Two ways a van proves who it is (receiver/broker/README.md):

* password mode: TLS with a server certificate, an account per van in the
  broker's password file (username = device id).
* certificate mode: mutual TLS; the van's certificate has CN = device id and
  the broker takes the username from it (``use_identity_as_username``).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click

from core.device_id import DEVICE_ID_RE

log = logging.getLogger(__name__)

BROKER_DIR = Path(__file__).resolve().parent / "broker"
CONF_TEMPLATE = BROKER_DIR / "mosquitto.conf.template"
ACL_FILE = BROKER_DIR / "acl"

# The one account that may read every van's batches. Fixed in receiver/broker/acl too.
RECEIVER_USER = "datalab-receiver"
# Names a device may never take: they carry rights or meaning in the ACL or broker.
RESERVED_NAMES = frozenset({RECEIVER_USER})

# mosquitto_passwd's own choice for the $7$ (PBKDF2-SHA512) format. More rounds
# would add nothing here: our passwords are random 192-bit tokens, not words a
# dictionary attack could find, and every CONNECT pays for the rounds.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12  # what Mosquitto 2.0 expects
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?{_LABEL}(\.{_LABEL})*$")

CONF_DEFAULTS: dict[str, str] = {
    "CONF_DIR": "/etc/mosquitto/datalab",
    "DATA_DIR": "/var/lib/mosquitto",
    "LOG_DEST": "file /var/log/mosquitto/mosquitto.log",
    "RUN_AS": "mosquitto",
    "DEVICE_BIND": "",
    "DEVICE_PORT": "8883",
    "DEVICE_CERT_PORT": "8884",
    "RECEIVER_BIND": "127.0.0.1",
    "RECEIVER_PORT": "8885",
}


class ProvisionError(Exception):
    """Something the operator has to fix; the message says what."""


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


# --- files -------------------------------------------------------------------


def write_secret(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read, with no moment at wider permissions."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with wider permissions
        os.write(fd, raw)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    path.chmod(0o644)


# --- openssl -----------------------------------------------------------------


def openssl_path() -> str:
    path = shutil.which("openssl")
    if not path:
        raise ProvisionError("the openssl command is not installed (apt-get install openssl)")
    return path


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    """Run openssl; its stderr goes into the error (it never contains key material)."""
    proc = subprocess.run(
        [openssl_path(), *args], input=stdin, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise ProvisionError(
            f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-800:]}"
        )
    return proc.stdout


def generate_key() -> bytes:
    """A new ECDSA P-256 private key, PEM. It goes to stdout, never to a file openssl makes."""
    return _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")


def _serial() -> str:
    # Random positive 127-bit serials: unique without a serial file to keep in step.
    return hex(secrets.randbits(126) | (1 << 126))


def _subject_cn(cn: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9 ._*-]{1,64}", cn):
        raise ProvisionError(f"{cn!r} is not a usable certificate common name")
    return f"/CN={cn}"


def ca_paths(ca_dir: str | Path) -> CertPair:
    d = Path(ca_dir)
    return CertPair(d / "ca.crt", d / "ca.key")


def create_ca(
    ca_dir: str | Path, *, name: str = "DataLab MQTT CA", days: int = 3650, force: bool = False
) -> CertPair:
    """Create the fleet's CA once. A second CA would orphan every certificate issued so far."""
    ca = ca_paths(ca_dir)
    if (ca.cert.exists() or ca.key.exists()) and not force:
        raise ProvisionError(
            f"a CA already exists in {ca.cert.parent}; a new one invalidates every "
            "server and device certificate (use --force if that is what you want)"
        )
    write_secret(ca.key, generate_key())
    cert = _openssl(
        "req", "-x509", "-new", "-key", str(ca.key), "-sha256", "-days", str(days),
        "-subj", _subject_cn(name), "-set_serial", _serial(),
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    write_public(ca.cert, cert)
    log.info("created CA %r in %s", name, ca.cert.parent)
    return ca


def _sign(ca_dir: str | Path, key: Path, cn: str, days: int, extensions: list[str]) -> bytes:
    """A certificate for ``key`` with subject CN=cn, signed by the CA in ca_dir."""
    ca = ca_paths(ca_dir)
    if not ca.cert.exists() or not ca.key.exists():
        raise ProvisionError(f"no CA in {ca.cert.parent}: run `provision init-ca` first")
    csr = _openssl("req", "-new", "-key", str(key), "-subj", _subject_cn(cn), "-sha256")
    with tempfile.TemporaryDirectory(prefix="datalab-ext-") as tmp:
        ext = Path(tmp) / "ext.cnf"
        ext.write_text("[v3]\n" + "\n".join(extensions) + "\n", encoding="ascii")
        return _openssl(
            "x509", "-req", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-set_serial", _serial(),
            "-days", str(days), "-sha256", "-extfile", str(ext), "-extensions", "v3",
            stdin=csr,
        )  # fmt: skip


def _issue(
    ca_dir: str | Path, out: CertPair, cn: str, days: int, extensions: list[str]
) -> CertPair:
    write_secret(out.key, generate_key())
    try:
        write_public(out.cert, _sign(ca_dir, out.key, cn, days, extensions))
    except ProvisionError:
        out.key.unlink(missing_ok=True)  # no orphan key without its certificate
        raise
    return out


def subject_alt_names(names: list[str]) -> str:
    """``DNS:`` or ``IP:`` entries: clients check the host they dial against these."""
    out = []
    for n in names:
        try:
            out.append(f"IP:{ipaddress.ip_address(n)}")
        except ValueError:
            if not HOSTNAME_RE.fullmatch(n):
                raise ProvisionError(f"{n!r} is neither an IP address nor a host name") from None
            out.append(f"DNS:{n}")
    return ",".join(out)


def issue_server_cert(
    ca_dir: str | Path, out_dir: str | Path, names: list[str], *, days: int = 825
) -> CertPair:
    """The broker's certificate, valid for every host name and IP address the vans dial."""
    if not names:
        raise ProvisionError("give at least one host name or IP address")
    sans = subject_alt_names(names)
    out = CertPair(Path(out_dir) / "server.crt", Path(out_dir) / "server.key")
    _issue(ca_dir, out, names[0], days, [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        # serverAuth only: this certificate cannot pass as a client's.
        "extendedKeyUsage=serverAuth",
        f"subjectAltName={sans}",
        "authorityKeyIdentifier=keyid",
    ])  # fmt: skip
    log.info("issued server certificate for %s", sans)
    return out


def check_device_id(device_id: str) -> str:
    """The id doubles as MQTT username, client id, topic level and certificate CN."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ProvisionError(
            f"device id {device_id!r} must be 1-63 characters of A-Z a-z 0-9 _ - "
            "and start with a letter or digit"
        )
    if device_id in RESERVED_NAMES:
        raise ProvisionError(f"{device_id!r} is reserved (it has the receiver's rights in the ACL)")
    return device_id


def issue_device_cert(
    ca_dir: str | Path, out_dir: str | Path, device_id: str, *, days: int = 825
) -> CertPair:
    """A van's client certificate, CN = device id (its MQTT username in certificate mode)."""
    check_device_id(device_id)
    d = Path(out_dir)
    out = CertPair(d / f"{device_id}.crt", d / f"{device_id}.key")
    _issue(ca_dir, out, device_id, days, [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        # clientAuth only: a van's certificate cannot impersonate the broker.
        "extendedKeyUsage=clientAuth",
        "authorityKeyIdentifier=keyid",
    ])  # fmt: skip
    log.info("issued client certificate for %s", device_id)
    return out


# --- passwords -----------------------------------------------------------------


def generate_password(nbytes: int = 24) -> str:
    """192 random bits, URL-safe: no quoting trouble in TOML or a password file."""
    return secrets.token_urlsafe(nbytes)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The ``$7$`` PBKDF2-SHA512 entry Mosquitto 2.0 reads (as mosquitto_passwd writes it)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_passwd_path() -> str | None:
    return shutil.which("mosquitto_passwd") or next(
        (
            p
            for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")
            if os.path.exists(p)
        ),
        None,
    )


def _check_user(user: str) -> None:
    # ':' separates user and hash; a newline would forge another line.
    if not user or any(c in user for c in ":\n\r") or user.startswith("#"):
        raise ProvisionError(f"{user!r} cannot be a Mosquitto username")


def _read_entries(passwd_file: Path) -> list[str]:
    if not passwd_file.exists():
        return []
    return passwd_file.read_text(encoding="utf-8").splitlines()


def _write_entries(passwd_file: Path, lines: list[str]) -> None:
    # Whole-file replace through a 0600 temp file: a crash never leaves half a file.
    tmp = passwd_file.with_name(passwd_file.name + ".tmp")
    write_secret(tmp, "".join(line + "\n" for line in lines))
    if passwd_file.exists():
        # Keep what the operator set up (e.g. root:mosquitto 0640 so the broker
        # can read it), as mosquitto_passwd does by rewriting in place.
        st = passwd_file.stat()
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.chown(tmp, st.st_uid, st.st_gid)
        tmp.chmod(stat.S_IMODE(st.st_mode))
    os.replace(tmp, passwd_file)


def _python_set(passwd_file: Path, user: str, password: str) -> None:
    entry = f"{user}:{hash_password(password)}"
    lines = [ln for ln in _read_entries(passwd_file) if ln.split(":", 1)[0] != user]
    _write_entries(passwd_file, [*lines, entry])


def _tool_set(tool: str, passwd_file: Path, user: str, password: str) -> None:
    # Not `-b`: that puts the password on the command line. Without it the tool
    # reads it twice from stdin. It keeps the file's mode, so create it 0600 first.
    if not passwd_file.exists():
        write_secret(passwd_file, b"")
    proc = subprocess.run(
        [tool, str(passwd_file), user],
        input=f"{password}\n{password}\n".encode(),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip()
        raise ProvisionError(f"mosquitto_passwd failed: {why}")


def set_password(
    passwd_file: str | Path, user: str, password: str, *, backend: str = "auto"
) -> str:
    """Add or update ``user`` in a Mosquitto password file; return the backend used.

    backend: ``mosquitto_passwd`` (the broker's own tool), ``python`` (writes the
    same ``$7$`` format itself, for hosts without the tool), or ``auto``.
    """
    _check_user(user)
    if not password:
        raise ProvisionError("empty password")
    path = Path(passwd_file)
    tool = mosquitto_passwd_path() if backend in ("auto", "mosquitto_passwd") else None
    if backend == "mosquitto_passwd" and tool is None:
        raise ProvisionError("mosquitto_passwd is not installed")
    if backend not in ("auto", "mosquitto_passwd", "python"):
        raise ProvisionError(f"unknown backend {backend!r}")
    # A new file is created 0600; an existing one keeps its owner and mode.
    if tool:
        _tool_set(tool, path, user, password)
    else:
        _python_set(path, user, password)
    log.info("set password of %s in %s", user, path)
    return "mosquitto_passwd" if tool else "python"


def remove_account(passwd_file: str | Path, user: str) -> bool:
    """Remove ``user``; True if it was there. The broker forgets it on SIGHUP."""
    _check_user(user)
    path = Path(passwd_file)
    lines = _read_entries(path)
    kept = [ln for ln in lines if ln.split(":", 1)[0] != user]
    if len(kept) == len(lines):
        return False
    _write_entries(path, kept)
    log.info("removed %s from %s", user, path)
    return True


def accounts(passwd_file: str | Path) -> list[str]:
    return [
        ln.split(":", 1)[0]
        for ln in _read_entries(Path(passwd_file))
        if ":" in ln and not ln.startswith("#")
    ]


# --- client configuration --------------------------------------------------------


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uplink_toml(
    *,
    host: str,
    port: int,
    username: str = "",
    password: str = "",
    ca_file: str,
    cert_file: str = "",
    key_file: str = "",
    table: str = "uplink",
    comment: str = "",
) -> str:
    """The ``[uplink]`` (or ``[receiver]``) table of a client's TOML: where and how to connect."""
    lines = [f"# {c}" for c in comment.splitlines()] + [f"[{table}]"]
    fields: list[tuple[str, str | int | bool]] = [
        ("host", host), ("port", port), ("tls", True), ("ca_file", ca_file),
    ]  # fmt: skip
    if username:
        fields += [("username", username), ("password", password)]
    if cert_file:
        fields += [("cert_file", cert_file), ("key_file", key_file)]
    for key, value in fields:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = _toml_str(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class DeviceBundle:
    """What to copy to one van: its TOML snippet and the files it names."""

    directory: Path
    toml: Path
    ca: Path
    cert: CertPair | None


def provision_device(
    device_id: str,
    *,
    mode: str,
    ca_dir: str | Path,
    out_dir: str | Path,
    host: str,
    port: int,
    passwd_file: str | Path | None = None,
    device_dir: str = "/etc/datalab-edge",
    days: int = 825,
    backend: str = "auto",
) -> DeviceBundle:
    """Everything for one van in ``out_dir/<device_id>/``, plus its account in password mode.

    ``device_dir`` is where the files will live on the van: the TOML names them there.
    """
    check_device_id(device_id)
    if mode not in ("password", "certificate"):
        raise ProvisionError(f"unknown mode {mode!r} (password or certificate)")
    bundle = Path(out_dir) / device_id
    ca = ca_paths(ca_dir)
    if not ca.cert.exists():
        raise ProvisionError(f"no CA in {ca.cert.parent}: run `provision init-ca` first")
    write_public(bundle / "ca.crt", ca.cert.read_bytes())
    on_van = device_dir.rstrip("/")
    note = f"device.id must be {device_id!r}: it is the MQTT identity the broker's ACL checks."
    cert: CertPair | None = None
    if mode == "password":
        if passwd_file is None:
            raise ProvisionError("password mode needs the broker's device password file")
        password = generate_password()
        set_password(passwd_file, device_id, password, backend=backend)
        text = uplink_toml(
            host=host, port=port, username=device_id, password=password,
            ca_file=f"{on_van}/ca.crt",
            comment=f"MQTT uplink of {device_id} (password mode).\n{note}",
        )  # fmt: skip
    else:
        cert = issue_device_cert(ca_dir, bundle, device_id, days=days)
        text = uplink_toml(
            host=host, port=port, ca_file=f"{on_van}/ca.crt",
            cert_file=f"{on_van}/{cert.cert.name}", key_file=f"{on_van}/{cert.key.name}",
            comment=f"MQTT uplink of {device_id} (certificate mode: the certificate's CN is the "
            f"username).\n{note}",
        )  # fmt: skip
    toml_path = bundle / "uplink.toml"
    write_secret(toml_path, text)  # holds the password in password mode
    return DeviceBundle(bundle, toml_path, bundle / "ca.crt", cert)


def generate_share_group() -> str:
    """A shared-subscription group name no van can guess.

    Mosquitto 2.0's acl_file never refuses a SUBSCRIBE (it checks ``read`` on each
    message it delivers), so a van may subscribe to ``$share/<group>/datalab/v1/+/batch``.
    Knowing the receivers' group, it would join it: the broker then hands it every n-th
    batch of every van, and drops it since the van may not read it (tests/
    test_broker_security.py shows both). The group name is therefore a secret like the
    receiver's password, kept in the same 0600 TOML.
    """
    return "ingest-" + secrets.token_hex(16)


def _existing_share_group(path: Path) -> str:
    try:
        group = tomllib.loads(path.read_text(encoding="utf-8")).get("receiver", {}).get("share_group", "")
    except (OSError, ValueError):
        return ""
    from receiver.config import weak_share_group

    # A guessable group from before (e.g. "ingest") is replaced, not kept: the workers all
    # read it from this file, so they move to the new one together.
    return group if isinstance(group, str) and weak_share_group(group) is None else ""


def provision_receiver(
    *, ca_dir: str | Path, passwd_file: str | Path, out: str | Path, host: str, port: int,
    backend: str = "auto", ca_file: str | None = None,
) -> Path:  # fmt: skip
    """The receiver account (new random password) and the ``[receiver]`` TOML naming it,
    with the workers' secret share group (kept when the file already has one: re-keying
    the password must not split the workers into two groups)."""
    ca = ca_paths(ca_dir)
    path = Path(out)
    group = _existing_share_group(path) or generate_share_group()
    password = generate_password()
    set_password(passwd_file, RECEIVER_USER, password, backend=backend)
    text = uplink_toml(
        host=host, port=port, username=RECEIVER_USER, password=password,
        ca_file=ca_file or str(ca.cert.resolve()), table="receiver",
        comment="Broker account of the receiver workers (all workers may share it) and their\n"
                "share group: a secret like the password (receiver/broker/README.md).",
    )  # fmt: skip
    write_secret(path, text + f"share_group = {_toml_str(group)}\n")
    return path


# --- broker configuration ----------------------------------------------------------

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


def render_broker_config(
    values: dict[str, str | int] | None = None, template: Path = CONF_TEMPLATE
) -> str:
    """mosquitto.conf from the shipped template; unknown or missing placeholders are errors."""
    merged = {**CONF_DEFAULTS, **{k: str(v) for k, v in (values or {}).items()}}
    unknown = set(merged) - set(CONF_DEFAULTS)
    if unknown:
        raise ProvisionError(f"unknown broker config values: {', '.join(sorted(unknown))}")

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in merged:
            raise ProvisionError(f"template placeholder @{m.group(1)}@ has no value")
        return merged[m.group(1)]

    text = _PLACEHOLDER.sub(sub, template.read_text(encoding="utf-8"))
    # An empty bind address leaves "listener 8883 ": Mosquitto wants no trailing blank.
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# --- CLI ---------------------------------------------------------------------------


def _fail(exc: ProvisionError) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def provision() -> None:
    """Certificates, broker accounts and client config for the fleet.

    \b
    First time, on the broker host (as root):
      datalab-receiver provision init-ca --ca-dir /root/datalab-ca
      datalab-receiver provision server-cert --ca-dir /root/datalab-ca \\
          --out-dir /etc/mosquitto/datalab mqtt.datalab.example.org 203.0.113.7
      datalab-receiver provision broker-config --out /etc/mosquitto/mosquitto.conf
      datalab-receiver provision add-receiver --ca-dir /root/datalab-ca \\
          --passwd-file /etc/mosquitto/datalab/receivers.passwd \\
          --out /etc/datalab/receiver-broker.toml
    Then per van:
      datalab-receiver provision add-device van-042 --ca-dir /root/datalab-ca \\
          --passwd-file /etc/mosquitto/datalab/devices.passwd --host mqtt.datalab.example.org
    See receiver/broker/README.md.
    """


@provision.command("init-ca")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False),
              help="Where ca.crt and ca.key go.")
@click.option("--name", default="DataLab MQTT CA", show_default=True, help="The CA's common name.")
@click.option("--days", default=3650, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True,
              help="Replace an existing CA (invalidates every certificate it issued).")
def init_ca_cmd(ca_dir: str, name: str, days: int, force: bool) -> None:
    """Create the fleet's certificate authority (once).

    ca.key signs every server and van certificate: keep it off the broker if you
    can (an offline machine), and back it up.

    \b
    Example:
      datalab-receiver provision init-ca --ca-dir /root/datalab-ca
    """
    try:
        ca = create_ca(ca_dir, name=name, days=days, force=force)
    except ProvisionError as exc:
        raise _fail(exc) from exc
    click.echo(f"CA certificate: {ca.cert}\nCA key (0600): {ca.key}")


@provision.command("server-cert")
@click.argument("names", nargs=-1, required=True)
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False),
              help="The CA made by init-ca.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Where server.crt and server.key go (the broker's conf dir).")
@click.option("--days", default=825, show_default=True, help="Validity in days.")
def server_cert_cmd(names: tuple[str, ...], ca_dir: str, out_dir: str, days: int) -> None:
    """Issue the broker's TLS certificate for NAMES (host names and/or IP addresses).

    Vans check the name they dial (uplink.host) against these, so list every
    name and address they may use. The first is also the subject CN.

    \b
    Example:
      datalab-receiver provision server-cert --ca-dir /root/datalab-ca \\
          --out-dir /etc/mosquitto/datalab mqtt.datalab.example.org 203.0.113.7
    """
    try:
        pair = issue_server_cert(ca_dir, out_dir, list(names), days=days)
        write_public(Path(out_dir) / "ca.crt", ca_paths(ca_dir).cert.read_bytes())
    except ProvisionError as exc:
        raise _fail(exc) from exc
    click.echo(f"server certificate: {pair.cert}\nserver key (0600): {pair.key}")
    click.echo(f"CA certificate copied to {Path(out_dir) / 'ca.crt'}")


@provision.command("device-cert")
@click.argument("device_id")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False),
              help="The CA made by init-ca.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False),
              help="Where <id>.crt/.key go.")
@click.option("--days", default=825, show_default=True, help="Validity in days.")
def device_cert_cmd(device_id: str, ca_dir: str, out_dir: str, days: int) -> None:
    """Issue a van's client certificate only (CN = DEVICE_ID).

    Usually `add-device --mode certificate` is what you want: it also writes the
    van's TOML. This is for renewing a certificate.

    \b
    Example:
      datalab-receiver provision device-cert van-042 --ca-dir /root/datalab-ca --out-dir ./van-042
    """
    try:
        pair = issue_device_cert(ca_dir, out_dir, device_id, days=days)
    except ProvisionError as exc:
        raise _fail(exc) from exc
    click.echo(f"certificate: {pair.cert}\nkey (0600): {pair.key}")


@provision.command("add-device")
@click.argument("device_id")
@click.option("--mode", type=click.Choice(["password", "certificate"]), default="password",
              show_default=True, help="How the van proves its identity.")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False),
              help="The CA made by init-ca.")
@click.option("--passwd-file", type=click.Path(dir_okay=False),
              help="The broker's device password file (password mode).")
@click.option("--host", required=True,
              help="Broker host name as the van dials it (must be in the server cert).")
@click.option("--port", type=int, help="Broker port [8883 password mode, 8884 certificate mode].")
@click.option("--out-dir", default="provisioned", show_default=True,
              type=click.Path(file_okay=False), help="The van's files go to OUT_DIR/DEVICE_ID/.")
@click.option("--device-dir", default="/etc/datalab-edge", show_default=True,
              help="Where the files will live on the van (the TOML names them there).")
@click.option("--days", default=825, show_default=True,
              help="Certificate validity (certificate mode).")
def add_device_cmd(device_id: str, mode: str, ca_dir: str, passwd_file: str | None, host: str,
                   port: int | None, out_dir: str, device_dir: str, days: int) -> None:  # fmt: skip
    """Provision van DEVICE_ID: its broker identity and its [uplink] TOML.

    Password mode adds an account with a new random password to the password
    file (re-running it changes the password). Certificate mode issues a client
    certificate with CN = DEVICE_ID. Either way OUT_DIR/DEVICE_ID/ holds
    uplink.toml (0600; merge it into the van's agent.toml) and ca.crt (and the
    certificate and key). The password is written only there, never shown.
    Reload the broker afterwards (systemctl reload mosquitto).

    \b
    Examples:
      datalab-receiver provision add-device van-042 --ca-dir /root/datalab-ca \\
          --passwd-file /etc/mosquitto/datalab/devices.passwd --host mqtt.datalab.example.org
      datalab-receiver provision add-device van-043 --mode certificate \\
          --ca-dir /root/datalab-ca --host mqtt.datalab.example.org
    """
    port = port or (8883 if mode == "password" else 8884)
    try:
        b = provision_device(
            device_id, mode=mode, ca_dir=ca_dir, out_dir=out_dir, host=host, port=port,
            passwd_file=passwd_file, device_dir=device_dir, days=days,
        )  # fmt: skip
    except ProvisionError as exc:
        raise _fail(exc) from exc
    click.echo(f"{device_id}: files in {b.directory}/, copy them to {device_dir}/ on the van")
    click.echo(f"merge the [uplink] table of {b.toml} into the van's agent.toml")
    if mode == "password":
        click.echo(f"account set in {passwd_file}: reload the broker (systemctl reload mosquitto)")


@provision.command("remove-device")
@click.argument("device_id")
@click.option("--passwd-file", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The broker's device password file.")
def remove_device_cmd(device_id: str, passwd_file: str) -> None:
    """Remove van DEVICE_ID's account (password mode); reload the broker after.

    A van in certificate mode is not stopped by this: revoke its certificate
    (CRL, see receiver/broker/README.md) or let it expire.

    \b
    Example:
      datalab-receiver provision remove-device van-042 \\
          --passwd-file /etc/mosquitto/datalab/devices.passwd
    """
    try:
        removed = remove_account(passwd_file, device_id)
    except ProvisionError as exc:
        raise _fail(exc) from exc
    if not removed:
        raise click.ClickException(f"{device_id} has no account in {passwd_file}")
    click.echo(f"removed {device_id}: reload the broker (systemctl reload mosquitto)")


@provision.command("add-receiver")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False),
              help="The CA made by init-ca.")
@click.option("--passwd-file", required=True, type=click.Path(dir_okay=False),
              help="The receiver listener's password file (receivers.passwd).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the [receiver] TOML with the account (0600).")
@click.option("--host", default="localhost", show_default=True,
              help="Broker host as the workers dial it.")
@click.option("--port", default=8885, show_default=True, help="The receiver listener's port.")
@click.option("--ca-file", help="CA path as the workers see it [the CA's absolute path].")
def add_receiver_cmd(
    ca_dir: str, passwd_file: str, out: str, host: str, port: int, ca_file: str | None
) -> None:
    """Create (or re-key) the receiver account datalab-receiver and write its TOML.

    The TOML's [receiver] keys (host, port, tls, ca_file, username, password,
    share_group) merge into the receiver's config file. Re-running it sets a new
    password and keeps the share group. The share group is a secret: a van that
    knows it can take a share of every van's batches (see receiver/broker/README.md).

    \b
    Example:
      datalab-receiver provision add-receiver --ca-dir /root/datalab-ca \\
          --passwd-file /etc/mosquitto/datalab/receivers.passwd \\
          --out /etc/datalab/receiver-broker.toml
    """
    try:
        path = provision_receiver(
            ca_dir=ca_dir, passwd_file=passwd_file, out=out, host=host, port=port, ca_file=ca_file
        )
    except ProvisionError as exc:
        raise _fail(exc) from exc
    click.echo(f"receiver account set in {passwd_file}; its config in {path} (0600)")


@provision.command("broker-config")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The mosquitto.conf to write.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help=f"Override a placeholder ({', '.join(CONF_DEFAULTS)}).")
@click.option("--install-acl/--no-install-acl", default=True, show_default=True,
              help="Also copy the shipped ACL to CONF_DIR/acl.")
def broker_config_cmd(out: str, settings: tuple[str, ...], install_acl: bool) -> None:
    """Write mosquitto.conf from the shipped template (and the ACL next to the certificates).

    \b
    Examples:
      datalab-receiver provision broker-config --out /etc/mosquitto/mosquitto.conf
      datalab-receiver provision broker-config --out ./mosquitto.conf \\
          --set RECEIVER_BIND=10.0.0.5 --set CONF_DIR=/srv/mqtt
    """
    values: dict[str, str | int] = {}
    for s in settings:
        name, sep, value = s.partition("=")
        if not sep:
            raise click.BadParameter(f"{s!r} is not NAME=VALUE", param_hint="--set")
        values[name.strip().upper()] = value
    try:
        text = render_broker_config(values)
    except ProvisionError as exc:
        raise _fail(exc) from exc
    write_public(Path(out), text)
    click.echo(f"wrote {out}")
    if install_acl:
        conf_dir = Path(str(values.get("CONF_DIR", CONF_DEFAULTS["CONF_DIR"])))
        write_public(conf_dir / "acl", ACL_FILE.read_bytes())
        click.echo(f"wrote {conf_dir / 'acl'}")
