"""The shipped broker configuration, enforced by a real Mosquitto.

One Mosquitto per module runs receiver/broker/mosquitto.conf.template and
receiver/broker/acl with throwaway credentials made by receiver/provision.py
(simulator.broker.LocalBroker in secure mode). Every "cannot" is proven against
a "can" in the same connection, so a test cannot pass because nothing works.

Mosquitto 2.0 behaviour the assertions rely on (checked here, see the ACL):
* a PUBLISH the ACL denies is PUBACKed and dropped: the sender cannot tell;
* SUBSCRIBE is never refused by acl_file; what a client may `read` is checked
  per message, so a too-wide subscription delivers only the allowed topics;
* Mosquitto is single-threaded and routes a PUBLISH before it acknowledges it,
  so a marker message sent after a dropped one (and after its PUBACK) proves
  the dropped one would have arrived first had it been delivered.
"""

from __future__ import annotations

import queue
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest

from receiver import provision as pv
from receiver.mqtt_consumer import ReceiverService
from simulator.broker import LocalBroker, SecureSetup, mosquitto_path
from tests.test_receiver_store import batch
from uplink.mqtt import MqttLink
from core.wire import decode_ack, encode_batch

pytestmark = pytest.mark.skipif(not mosquitto_path(), reason="mosquitto is not installed")

TIMEOUT = 10.0
P = "datalab/v1"


# --- a small synchronous MQTT client for probing ----------------------------------


class Probe:
    """One MQTT connection whose every step is awaited: connect, subscribe, publish."""

    _n = 0

    def __init__(
        self,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert: pv.CertPair | None = None,
        client_id: str | None = None,
    ) -> None:
        Probe._n += 1
        self.port = port
        self.c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{Probe._n}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.c.username_pw_set(username, password)
        if ca_file:
            self.c.tls_set(
                ca_certs=ca_file,
                certfile=str(cert.cert) if cert else None,
                keyfile=str(cert.key) if cert else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.connack: mqtt.ReasonCode | None = None
        self.answered = threading.Event()  # CONNACK or connection closed
        self.disconnected = threading.Event()
        self._looping = False
        self.messages: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self._subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self._subacked = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, rc, props):  # type: ignore[no-untyped-def]
        self.connack = rc
        self.answered.set()

    def _on_disconnect(self, client, userdata, flags, rc, props):  # type: ignore[no-untyped-def]
        self.disconnected.set()
        self.answered.set()

    def _on_subscribe(self, client, userdata, mid, rcs, props):  # type: ignore[no-untyped-def]
        with self._subacked:
            self._subacks[mid] = list(rcs)
            self._subacked.notify_all()

    def connect(self) -> str:
        """"ok", "refused: <reason>", or "closed: <why>" (TLS or transport failure)."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
            # Run the network loop here until the broker answers: a refused probe
            # then never has a background thread to wait for when it is closed.
            deadline = time.monotonic() + TIMEOUT
            while not self.answered.is_set() and time.monotonic() < deadline:
                if self.c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except (ssl.SSLError, OSError) as exc:
            return f"closed: {type(exc).__name__}: {exc}"
        if self.connack is None:
            return "closed: connection dropped before CONNACK"
        if self.connack.is_failure:
            return f"refused: {self.connack}"
        self.c.loop_start()
        self._looping = True
        return "ok"

    def subscribe(self, *topics: str) -> list[mqtt.ReasonCode]:
        rcs: list[mqtt.ReasonCode] = []
        for topic in topics:
            _, mid = self.c.subscribe(topic, qos=1)
            with self._subacked:
                got = self._subacked.wait_for(lambda: mid in self._subacks, TIMEOUT)
                assert got, f"no SUBACK for {topic}"
                rcs += self._subacks[mid]
        return rcs

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait().topic)
            except queue.Empty:
                return out

    def close(self) -> None:
        self.c.disconnect()
        if self._looping:
            self.c.loop_stop()


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    b = LocalBroker(
        "mosquitto",
        workdir=tmp_path_factory.mktemp("secure-broker"),
        secure=SecureSetup(
            devices=("van-a", "van-b"), cert_devices=("van-c",), plain_listener=True
        ),
    )
    b.start()
    yield b
    b.close()


@pytest.fixture
def probes(broker: LocalBroker) -> Iterator[Callable[..., Probe]]:
    """Connected probes, closed after the test. ``kind``: device, cert, receiver, plain."""
    made: list[Probe] = []
    info = broker.secure_info
    assert info is not None

    def make(kind: str, user: str | None = None, **kw: object) -> Probe:
        if kind == "device":
            p = Probe(info.device_port, username=user, password=info.passwords[user or ""],
                      ca_file=info.ca_file, **kw)  # fmt: skip
        elif kind == "cert":
            p = Probe(info.cert_port, ca_file=info.ca_file, cert=info.client_certs[user or ""],
                      **kw)  # fmt: skip
        elif kind == "receiver":
            p = Probe(info.receiver_port, username=pv.RECEIVER_USER,
                      password=info.passwords[pv.RECEIVER_USER], ca_file=info.ca_file,
                      **kw)  # fmt: skip
        else:
            raise ValueError(kind)
        made.append(p)
        result = p.connect()
        assert result == "ok", f"{kind} {user}: {result}; broker log:\n{tail(broker)}"
        return p

    yield make
    for p in made:
        p.close()


def log_mark(broker: LocalBroker) -> int:
    return broker.log_path.stat().st_size


def logged(broker: LocalBroker, mark: int, text: str) -> bool:
    """The broker's own reason: ``text`` appeared in its log after ``mark``."""
    return wait_until(lambda: text in broker.log_path.read_bytes()[mark:].decode(errors="replace"))


def tail(broker: LocalBroker) -> str:
    return broker.log_path.read_text(errors="replace")[-2000:]


def attempt(port: int, **kw: object) -> str:
    p = Probe(port, **kw)  # type: ignore[arg-type]
    try:
        return p.connect()
    finally:
        p.close()


# --- who may connect -------------------------------------------------------------------


def test_own_password_connects_and_nothing_else_does(broker: LocalBroker) -> None:
    info = broker.secure_info
    assert info is not None
    ca = info.ca_file
    pw = info.passwords
    assert attempt(info.device_port, username="van-a", password=pw["van-a"], ca_file=ca) == "ok"
    # no credentials at all, on every listener that takes passwords
    for port in (info.device_port, info.receiver_port):
        assert attempt(port, ca_file=ca).startswith("refused: Not authorized")
    # a wrong password, and another van's password
    for wrong in ("guess", pw["van-b"]):
        result = attempt(info.device_port, username="van-a", password=wrong, ca_file=ca)
        assert result.startswith("refused: Not authorized")
    # the two listeners read different password files: neither account works on the other one
    result = attempt(info.receiver_port, username="van-a", password=pw["van-a"], ca_file=ca)
    assert result.startswith("refused")
    assert attempt(
        info.device_port, username=pv.RECEIVER_USER, password=pw[pv.RECEIVER_USER], ca_file=ca
    ).startswith("refused")


def test_tls_listener_refuses_plain_tcp(broker: LocalBroker) -> None:
    info = broker.secure_info
    assert info is not None and info.plain_port is not None
    creds = {"username": "van-a", "password": info.passwords["van-a"]}
    # The same credentials work on the plain listener, so only the missing TLS is refused.
    assert attempt(info.plain_port, **creds) == "ok"
    for port in (info.device_port, info.cert_port, info.receiver_port):
        mark = log_mark(broker)
        assert attempt(port, **creds).startswith("closed"), port
        assert logged(broker, mark, "wrong version number")  # OpenSSL saw a plain MQTT CONNECT


def test_client_must_trust_our_ca(broker: LocalBroker, tmp_path: Path) -> None:
    """A van with the wrong CA file (a man in the middle, from its side) does not talk."""
    info = broker.secure_info
    assert info is not None
    other = pv.create_ca(tmp_path / "other-ca", name="Someone else", days=1)
    result = attempt(info.device_port, username="van-a", password=info.passwords["van-a"],
                     ca_file=str(other.cert))  # fmt: skip
    assert result.startswith("closed") and "CERTIFICATE_VERIFY_FAILED" in result


# --- what a van may do -----------------------------------------------------------------


def test_van_cannot_publish_as_another_van(probes: Callable[..., Probe]) -> None:
    rx = probes("receiver")
    subacks = rx.subscribe(f"{P}/+/batch", f"{P}/+/status", f"{P}/+/ack")
    assert not any(rc.is_failure for rc in subacks)
    a = probes("device", "van-a")
    a.publish(f"{P}/van-a/batch", b"own-1")
    # Each forged publish is PUBACKed like any other: the van cannot even tell it was dropped.
    a.publish(f"{P}/van-b/batch", b"forged-batch")
    a.publish(f"{P}/van-b/status", b"forged-status")
    a.publish(f"{P}/van-b/ack", b"forged-ack")
    a.publish(f"{P}/van-a/ack", b"self-ack")  # a van does not write acks, not even its own
    a.publish(f"{P}/other/van-a/batch", b"outside the tree")
    a.publish(f"{P}/van-a/status", b"own-status")
    a.publish(f"{P}/van-a/batch", b"own-2")  # the marker: everything above came first
    got = [(m.topic, m.payload) for m in (rx.next_message() for _ in range(3))]
    assert got == [
        (f"{P}/van-a/batch", b"own-1"),
        (f"{P}/van-a/status", b"own-status"),
        (f"{P}/van-a/batch", b"own-2"),
    ]
    assert rx.drain() == []


def test_van_reads_only_its_own_acks_and_config(probes: Callable[..., Probe]) -> None:
    a = probes("device", "van-a")
    b = probes("device", "van-b")
    rx = probes("receiver")
    # Mosquitto 2.0 grants any SUBSCRIBE (see the module doc); the ACL acts on delivery.
    a.subscribe(f"{P}/van-a/ack", f"{P}/van-a/config")
    subacks = a.subscribe(f"{P}/van-b/ack", f"{P}/+/ack", f"{P}/+/batch", "#")
    assert not any(rc.is_failure for rc in subacks)  # granted, yet nothing of B's arrives
    b.subscribe(f"{P}/van-b/ack", f"{P}/van-b/config")
    rx.publish(f"{P}/van-b/ack", b"ack for b")
    rx.publish(f"{P}/van-b/config", b"config for b")
    b.publish(f"{P}/van-b/batch", b"b's batch")
    rx.publish(f"{P}/van-a/config", b"config for a")
    rx.publish(f"{P}/van-a/ack", b"ack for a")  # the marker
    got_a = [(m.topic, m.payload) for m in (a.next_message() for _ in range(2))]
    assert got_a == [(f"{P}/van-a/config", b"config for a"), (f"{P}/van-a/ack", b"ack for a")]
    assert a.drain() == []
    got_b = [(m.topic, m.payload) for m in (b.next_message() for _ in range(2))]
    assert got_b == [(f"{P}/van-b/ack", b"ack for b"), (f"{P}/van-b/config", b"config for b")]


def test_van_cannot_take_over_another_vans_session(
    broker: LocalBroker, probes: Callable[..., Probe]
) -> None:
    """use_username_as_clientid: connecting with B's client id does not kick B off."""
    b = probes("device", "van-b", client_id="van-b")
    b.subscribe(f"{P}/van-b/ack")
    probes("device", "van-a", client_id="van-b")  # would take over B's session without the setting
    rx = probes("receiver")
    rx.publish(f"{P}/van-b/ack", b"still there?")
    assert b.next_message().payload == b"still there?"
    assert not b.disconnected.is_set()


# --- the receiver account ----------------------------------------------------------------


def test_receiver_reads_every_van_plain_and_shared_and_writes_acks(
    probes: Callable[..., Probe],
) -> None:
    rx_plain = probes("receiver")
    rx_shared = probes("receiver")
    assert not any(rc.is_failure for rc in rx_plain.subscribe(f"{P}/+/batch"))
    assert not any(rc.is_failure for rc in rx_shared.subscribe(f"$share/ingest/{P}/+/batch"))
    a = probes("device", "van-a")
    b = probes("device", "van-b")
    a.subscribe(f"{P}/van-a/ack")
    a.publish(f"{P}/van-a/batch", b"from a")
    b.publish(f"{P}/van-b/batch", b"from b")
    plain = {(m.topic, m.payload) for m in (rx_plain.next_message() for _ in range(2))}
    shared = {(m.topic, m.payload) for m in (rx_shared.next_message() for _ in range(2))}
    expected = {(f"{P}/van-a/batch", b"from a"), (f"{P}/van-b/batch", b"from b")}
    assert plain == expected and shared == expected
    rx_shared.publish(f"{P}/van-a/ack", b"stored")
    assert a.next_message().payload == b"stored"


def test_a_van_in_a_known_share_group_takes_batches_from_the_receivers(
    probes: Callable[..., Probe],
) -> None:
    """What Mosquitto 2.0 does (the "can" for the test below): acl_file grants a van's SUBSCRIBE
    to ``$share/<group>/...``; the van then gets every n-th batch of every van and the broker,
    checking ``read`` on delivery, drops it. So a group name a van knows loses batches."""
    rx = probes("receiver")
    rx.subscribe(f"$share/ingest/{P}/+/batch")
    a = probes("device", "van-a")
    assert not any(rc.is_failure for rc in a.subscribe(f"$share/ingest/{P}/+/batch"))
    b = probes("device", "van-b")
    for i in range(20):
        b.publish(f"{P}/van-b/batch", b"b%d" % i)
    b.publish(f"{P}/van-b/batch", b"marker")  # routed after the 20: once it is in, all are
    got: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while b"marker" not in got and time.monotonic() < deadline:
        try:
            got.append(rx.next_message(0.5).payload)
        except queue.Empty:
            pass
    lost = 21 - len(got)
    print(f"guessable group 'ingest': receiver got {len(got)} of 21, {lost} handed to van-a and dropped")
    assert a.drain() == [] and 0 < lost < 21


def test_van_cannot_join_the_provisioned_share_group(
    broker: LocalBroker, probes: Callable[..., Probe], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The receivers' group is a secret made by provisioning: every batch of van B reaches the
    receiver (stored and acknowledged) while van A subscribes to every share group and batch
    topic it might guess, and van A receives nothing."""
    import logging

    from receiver.config import load_receiver_config

    caplog.set_level(logging.INFO, logger="receiver.mqtt_consumer")
    info = broker.secure_info
    assert info is not None
    toml = pv.provision_receiver(ca_dir=info.ca_dir, passwd_file=tmp_path / "r.passwd", out=tmp_path / "rx.toml",
                                 host="127.0.0.1", port=info.receiver_port, backend="python")  # fmt: skip
    group = load_receiver_config(toml).share_group
    assert group.startswith("ingest-") and len(group) >= 32
    pv.provision_receiver(ca_dir=info.ca_dir, passwd_file=tmp_path / "r.passwd", out=toml, host="127.0.0.1",
                          port=info.receiver_port, backend="python")  # re-keying keeps the group
    assert load_receiver_config(toml).share_group == group

    cfg = broker.receiver_config(str(tmp_path / "store.sqlite"), client_id="rx-share", share_group=group)
    svc = ReceiverService(cfg)
    svc.start()
    try:
        assert svc.subscribed.wait(TIMEOUT), tail(broker)
        a = probes("device", "van-a")
        guesses = [f"$share/{g}/{P}/+/batch" for g in ("ingest", "datalab", "receiver", "ingest-1", "workers")]
        subacks = a.subscribe(*guesses, f"{P}/+/batch", f"{P}/van-b/batch", "#")
        assert not any(rc.is_failure for rc in subacks)  # all granted (Mosquitto 2.0), none of any use
        b = probes("device", "van-b")
        b.subscribe(f"{P}/van-b/ack")
        n = 40
        for i in range(n):
            b.publish(f"{P}/van-b/batch", encode_batch(batch(i, 1, device="van-b")))
        acks = []
        deadline = time.monotonic() + 3 * TIMEOUT
        while len(acks) < n and time.monotonic() < deadline:
            try:
                acks.append(decode_ack(b.next_message(0.5).payload, "van-b"))  # binary: v4 batches
            except queue.Empty:
                pass
        stored = sorted(x.batch_id for x in acks if x.status == "stored")
        assert len(stored) == n, f"{len(stored)} of {n} of van B's batches stored; log:\n{tail(broker)}"
        assert svc.store.counts()["batches_stored"] == n
        assert a.drain() == [], "van A received something"
        print(f"provisioned group: {n} of {n} van-b batches stored and acked; van-a in {len(guesses)} "
              "guessed groups and on every batch topic received 0")
        # The group is a secret: the log names the subscription without it (issue 13, 6.2).
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "$share/***/" in logged and group not in logged, logged
    finally:
        svc.stop()


def _run_receiver_cli(args: list[str], ready: Path) -> str:
    """``datalab-receiver run`` as deployed, until it has subscribed; what it wrote to stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "receiver.cli", "run", *args, "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "receiver did not subscribe"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    return err.decode(errors="replace")


def test_receiver_warns_loudly_of_a_guessable_share_group(broker: LocalBroker, tmp_path: Path) -> None:
    """Issue 13, 6.1: no guessable example in the help, the group read from the provisioned file,
    a loud warning for a short one (as the one the help used to suggest) or one on the command line,
    and re-provisioning replaces a guessable group instead of keeping it."""
    from click.testing import CliRunner

    from receiver.cli import main
    from receiver.config import load_receiver_config, weak_share_group

    helptext = CliRunner().invoke(main, ["run", "--help"]).output
    assert "--share-group ingest" not in helptext and "share_group" in helptext

    info = broker.secure_info
    assert info is not None
    toml = tmp_path / "rx.toml"
    pv.provision_receiver(ca_dir=info.ca_dir, passwd_file=tmp_path / "r.passwd", out=toml, host="127.0.0.1",
                          port=info.receiver_port, backend="python")  # fmt: skip
    group = load_receiver_config(toml).share_group
    assert weak_share_group(group) is None
    for weak in ("ingest", "datalab-receivers-production", "ingest-1", "workers-2026"):
        assert weak_share_group(weak) is not None, weak

    cfg = broker.receiver_config(str(tmp_path / "s.sqlite"))
    own = tmp_path / "own.toml"
    base = (f'[receiver]\nhost = "127.0.0.1"\nport = {cfg.port}\ntls = true\nca_file = "{cfg.ca_file}"\n'
            f'username = "{cfg.username}"\npassword = "{cfg.password}"\nstore = "{tmp_path / "s.sqlite"}"\n')
    own.write_text(base + f'share_group = "{group}"\n')
    err = _run_receiver_cli(["--config", str(own)], tmp_path / "r1")
    assert "INSECURE" not in err and "WARNING:" not in err and group not in err and "$share/***/" in err, err
    own.write_text(base + 'share_group = "ingest"\n')
    err = _run_receiver_cli(["--config", str(own)], tmp_path / "r2")
    assert "WARNING: share group of 6 characters without a random part" in err, err
    own.write_text(base)
    err = _run_receiver_cli(["--config", str(own), "--share-group", group], tmp_path / "r3")
    assert "process list" in err and "without a random part" not in err, err
    print("help without a guessable group; a provisioned group starts quietly; 'ingest' and a group on the "
          "command line warn on stderr")

    # An old file with the guessable group: provisioning again gives it a random one.
    old = tmp_path / "old.toml"
    old.write_text('[receiver]\nshare_group = "ingest"\n')
    pv.provision_receiver(ca_dir=info.ca_dir, passwd_file=tmp_path / "r.passwd", out=old, host="127.0.0.1",
                          port=info.receiver_port, backend="python")  # fmt: skip
    assert weak_share_group(load_receiver_config(old).share_group) is None


# --- certificate mode ----------------------------------------------------------------------


def test_certificate_identity_is_the_username(probes: Callable[..., Probe]) -> None:
    rx = probes("receiver")
    rx.subscribe(f"{P}/+/batch")
    c = probes("cert", "van-c")  # no username or password: the CN is the identity
    c.subscribe(f"{P}/van-c/ack")
    c.publish(f"{P}/van-a/batch", b"forged")
    c.publish(f"{P}/van-c/batch", b"own")
    m = rx.next_message()
    assert (m.topic, m.payload) == (f"{P}/van-c/batch", b"own")
    rx.publish(f"{P}/van-c/ack", b"ack")
    assert c.next_message().payload == b"ack"
    assert rx.drain() == []


def test_certificate_listener_refuses_foreign_and_missing_certificates(
    broker: LocalBroker, tmp_path: Path
) -> None:
    info = broker.secure_info
    assert info is not None
    ca = info.ca_file
    # A certificate for the same CN from another CA.
    other = pv.create_ca(tmp_path / "other-ca", name="Rogue CA", days=1)
    rogue = pv.issue_device_cert(other.cert.parent, tmp_path / "rogue", "van-c", days=1)
    mark = log_mark(broker)
    assert attempt(info.cert_port, ca_file=ca, cert=rogue).startswith("closed")
    assert logged(broker, mark, "certificate verify failed")
    # No certificate at all, even with a valid password.
    mark = log_mark(broker)
    assert attempt(info.cert_port, ca_file=ca, username="van-a",
                   password=info.passwords["van-a"]).startswith("closed")  # fmt: skip
    assert logged(broker, mark, "peer did not return a certificate")
    # Our own server certificate is for serverAuth only: it cannot log in as "localhost".
    server = pv.CertPair(info.conf_dir / "server.crt", info.conf_dir / "server.key")
    mark = log_mark(broker)
    assert attempt(info.cert_port, ca_file=ca, cert=server).startswith("closed")
    assert logged(broker, mark, "certificate verify failed")
    # ...while the real one still works, so the refusals above are about the certificates.
    assert attempt(info.cert_port, ca_file=ca, cert=info.client_certs["van-c"]) == "ok"


# --- the real uplink and receiver over TLS ---------------------------------------------------


def _deliver_one(broker: LocalBroker, tmp_path: Path, device: str, *, certificate: bool) -> None:
    cfg = broker.receiver_config(str(tmp_path / "store.sqlite"), client_id=f"rx-{device}",
                                 share_group=f"ingest-{device}")  # fmt: skip
    svc = ReceiverService(cfg)
    link = MqttLink(broker.uplink_config(device, certificate=certificate), device)
    svc.start()
    try:
        assert svc.subscribed.wait(TIMEOUT), tail(broker)
        link.start()
        assert wait_until(lambda: link.connected), tail(broker)
        b = batch(0, 3, device=device)
        assert link.publish(b.batch_id, encode_batch(b))
        acks: list = []
        assert wait_until(lambda: bool(acks.extend(link.acks()) or acks)), "no ack came back"
        assert [(a.batch_id, a.status) for a in acks] == [(f"{device}/e1/1-6", "stored")]
        assert svc.store.counts()["samples"] == 6
    finally:
        link.stop()
        svc.stop()


def test_device_uplink_and_receiver_end_to_end_over_tls(
    broker: LocalBroker, tmp_path: Path
) -> None:
    _deliver_one(broker, tmp_path, "van-a", certificate=False)


def test_device_uplink_in_certificate_mode(broker: LocalBroker, tmp_path: Path) -> None:
    _deliver_one(broker, tmp_path, "van-c", certificate=True)


# --- provisioning ---------------------------------------------------------------------------


def test_password_file_written_without_mosquitto_passwd_is_accepted(tmp_path: Path) -> None:
    """The pure-Python $7$ writer, for hosts without mosquitto_passwd, against the real broker."""
    setup = SecureSetup(devices=("van-x",), passwd_backend="python")
    with LocalBroker("mosquitto", workdir=tmp_path / "b", secure=setup) as b:
        info = b.secure_info
        assert info is not None
        port, ca = info.device_port, info.ca_file
        assert attempt(port, username="van-x", password=info.passwords["van-x"], ca_file=ca) == "ok"
        assert attempt(port, username="van-x", password="nope", ca_file=ca) != "ok"


def test_hash_matches_mosquitto_format() -> None:
    salt = bytes(range(12))
    entry = pv.hash_password("s3cret", salt=salt)
    algo, iterations, salt_b64, digest_b64 = entry.split("$")[1:]
    assert (algo, iterations, salt_b64) == ("7", "101", "AAECAwQFBgcICQoL")
    assert len(digest_b64) == 88  # 64-byte SHA-512 digest, base64


def test_provision_device_bundles_and_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import tomllib

    from click.testing import CliRunner

    caplog.set_level(logging.DEBUG)
    ca_dir, passwd = tmp_path / "ca", tmp_path / "devices.passwd"
    run = CliRunner().invoke
    r = run(pv.provision, ["init-ca", "--ca-dir", str(ca_dir)])
    assert r.exit_code == 0, r.output
    assert run(pv.provision, ["init-ca", "--ca-dir", str(ca_dir)]).exit_code != 0  # once only
    out = str(tmp_path / "out")
    common = ["--ca-dir", str(ca_dir), "--host", "mqtt.example.org", "--out-dir", out]
    r = run(pv.provision, ["add-device", "van-042", "--passwd-file", str(passwd), *common])
    assert r.exit_code == 0, r.output
    toml_path = tmp_path / "out" / "van-042" / "uplink.toml"
    up = tomllib.loads(toml_path.read_text())["uplink"]
    assert up["username"] == "van-042" and up["tls"] is True and up["port"] == 8883
    assert len(up["password"]) >= 32
    # the secret is in the 0600 files only: not on the screen, not in the log
    assert up["password"] not in r.output and up["password"] not in caplog.text
    for secret in (toml_path, passwd, ca_dir / "ca.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert pv.accounts(passwd) == ["van-042"]
    r = run(pv.provision, ["add-device", "van-043", "--mode", "certificate", *common])
    assert r.exit_code == 0, r.output
    up = tomllib.loads((tmp_path / "out" / "van-043" / "uplink.toml").read_text())["uplink"]
    assert "username" not in up and up["cert_file"].endswith("van-043.crt") and up["port"] == 8884
    assert stat.S_IMODE((tmp_path / "out" / "van-043" / "van-043.key").stat().st_mode) == 0o600
    # a device may not take the receiver's name, nor a name that is not a device id
    for bad in (pv.RECEIVER_USER, "van/1", "+", "#"):
        r = run(pv.provision, ["add-device", bad, "--passwd-file", str(passwd), *common])
        assert r.exit_code != 0
    r = run(pv.provision, ["remove-device", "van-042", "--passwd-file", str(passwd)])
    assert r.exit_code == 0, r.output
    assert pv.accounts(passwd) == []


def test_shipped_config_renders_with_defaults() -> None:
    text = pv.render_broker_config()
    assert "@" not in text.replace("log_timestamp_format", "")
    assert "listener 8883\n" in text and "listener 8885 127.0.0.1\n" in text
    assert "allow_anonymous true" not in text
    with pytest.raises(pv.ProvisionError):
        pv.render_broker_config({"NO_SUCH": "x"})
