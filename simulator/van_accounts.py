"""One broker identity per simulated van, for ``datalab-sim fleet --receiver-url`` (issue 17.6).

Why: the shipped broker (receiver/broker/acl) lets a device publish only under its own
topic, named by its account. A fleet whose vans all dial with one account in the URL
therefore delivers one van's batches and has every other van's dropped (PUBACKed, so the
vans cannot even tell). Each van gets what ``datalab-receiver provision add-device`` gives a
real one, made by the same function (``provision_device``) from the centre's CA:

* certificate mode (default): a client certificate with CN = the van's id, for the
  broker's certificate listener (8884 in the shipped config), which takes the CN as the
  username; nothing on the broker changes, so no reload.
* password mode (``passwd_file``): a new random password per van in the broker's device
  password file; Mosquitto reads that file again on a reload, so ``reload_command`` (e.g.
  ``systemctl reload mosquitto``) is run once after all vans are written, before any drives.

The files go to ``<out>/accounts/<van>/`` (0600 for secrets); the van's ``[uplink]`` names
them there. A password is never printed.
"""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from simulator.broker_url import BrokerTarget


class AccountError(RuntimeError):
    """The vans' accounts could not be made (no CA, a reload that failed ...): one line, no secret."""


@dataclass(frozen=True, slots=True)
class VanAccounts:
    ca_dir: Path  # the centre's CA (provision init-ca)
    passwd_file: Path | None = None  # password mode: the broker's device password file
    reload_command: str = ""  # password mode: makes the broker read the password file again

    @property
    def mode(self) -> str:
        return "password" if self.passwd_file is not None else "certificate"


def provision_vans(accounts: VanAccounts, devices: list[str], target: BrokerTarget,
                   out: Path) -> dict[str, dict[str, object]]:
    """Each van's ``[uplink]`` keys (host, port, tls, ca_file, and its account or certificate)."""
    from receiver.provision import ProvisionError, provision_device

    if not target.tls:
        raise AccountError("per-van accounts need an mqtts:// --receiver-url (the broker checks them over TLS)")
    if target.username or target.password:
        raise AccountError("the URL names one account for every van; with per-van accounts leave it out")
    uplinks: dict[str, dict[str, object]] = {}
    for device in devices:
        where = (out / "accounts").resolve()
        try:
            bundle = provision_device(device, mode=accounts.mode, ca_dir=accounts.ca_dir, out_dir=where,
                                      host=target.host, port=target.port, passwd_file=accounts.passwd_file,
                                      device_dir=str(where / device))
        except ProvisionError as exc:
            raise AccountError(f"{device}: {exc}") from None
        uplinks[device] = tomllib.loads(bundle.toml.read_text(encoding="utf-8"))["uplink"]
    if accounts.mode == "password" and accounts.reload_command:
        _reload(accounts.reload_command)
    return uplinks


def _reload(command: str) -> None:
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AccountError(f"the broker reload command failed: {type(exc).__name__}: {exc}") from None
    if done.returncode != 0:
        raise AccountError(f"the broker reload command exited with {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-300:]}")
