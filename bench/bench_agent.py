"""Agent CPU per van-hour and RSS, in the shipped configuration (issue #18).

Each van runs in a process of its own (so its CPU and RSS are its own) for
``seconds`` of real time after a warm-up, with:

* a CONNECTED uplink: a real Mosquitto with the shipped TLS listener, ACL and a
  per-device password account (simulator/broker.py secure mode), and the real
  receiver in another process storing and acknowledging every batch;
* the default batch and heartbeat settings (batches sealed by age every 60 s,
  a retained heartbeat every 60 s);
* the real drivers reading simulated devices in a third process
  (simulator/pty_devices.py): a PMS5003 with noisy readings and a GPS at 1 Hz that
  keeps present UTC (so the agent has TRUSTED time, checked below) and sends
  the sentence mix of a u-blox NEO-M9N capture (23 sentences a second);
  the NO2 ADC and the sound module on the in-process fake I2C bus with noisy
  inputs.

Rows: the van with PM, NO2, the sound module and GPS; the microphone van (the
same with a 48 kHz microphone in place of the sound module: its blocks come
paced in real time from a pre-shaped loop, as ALSA would deliver them) and its
RSS; the baseline in the same run, the same connected agent loop with
value-level simulated sensors (the agent without drivers).

Target (issue #18): at most 5 CPU-seconds per van-hour; microphone van RSS < 50 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGET_CPU_S_PER_HOUR = 5.0
TARGET_RSS_MB = 50.0
NMEA_MIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gps" / "ublox-neo-m9n-nmea.log"
KINDS = ("module", "mic", "values")


# -- one van, in a child process -------------------------------------------------------

class _Bus:
    """Simulated I2C hardware: the NO2 ADC and the sound module, with noisy inputs."""

    def __init__(self, rng: random.Random, microphone: Any = None) -> None:
        from drivers.i2c import FakeI2CBus
        from simulator.i2c_devices import FakeADS1115, FakeSoundModule

        # No transaction log: it is a test aid that grows without bound and is
        # the fake's cost, not the agent's (bench_ads1115 leaves it out too).
        self.bus = FakeI2CBus(keep_log=False)
        volts = {0: 0.320, 1: 0.306, 2: 0.650}  # WE, AE, temperature (15 °C) in volts
        self.bus.attach(0x49, FakeADS1115(source=lambda ch: volts.get(ch, 0.0) + rng.gauss(0.0, 0.002)))
        # Fast levels swing within each second: LAmin/LAmax differ from LAeq, as on a street.
        self.bus.attach(0x48, FakeSoundModule(source=lambda: 62.0 + rng.gauss(0.0, 3.0), fluctuation_db=3.0, seed=1))
        self.ports: dict[str, str] = {}
        self.microphone = microphone


class _PacedMicrophone:
    """A microphone whose 0.1-s blocks arrive in real time, as from ALSA.

    The audio is shaped once (simulator/hardware.py LoopedMicrophone) before the
    warm-up ends; read_block waits for the block's time and hands the next one.
    """

    def __init__(self, rng: random.Random) -> None:
        from simulator.hardware import LoopedMicrophone

        # A 2-s loop: the simulator's own buffer (0.4 MB) must not pass for the agent's RSS.
        self._mic = LoopedMicrophone(lambda t: 62.0 + 4.0 * rng.random(), seed=1, loop_s=2.0)
        self.block, self.sample_rate = self._mic.block, self._mic.sample_rate
        self._due = time.monotonic()

    def read_block(self) -> Any:
        self._due += self.block / self.sample_rate
        delay = self._due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return self._mic.read_block()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread, by name (Linux /proc): where a van's CPU goes."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[t.name] = out.get(t.name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_parts(top: int = 10) -> dict[str, float]:
    """MB of resident memory by mapping (/proc/self/smaps), the largest ``top``: what a van's RSS is."""
    out: dict[str, float] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 6)
        if "-" in head[0] and not head[0].endswith(":"):
            name = head[5].rsplit("/", 1)[-1] if len(head) > 5 else "[anon]"
        elif head[0] == "Rss:":
            out[name] = out.get(name, 0.0) + int(head[1]) / 1024.0
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:top]}


def _sensors(kind: str, ports: dict[str, str], no2_sheet: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The van's sensors, configured as a van's are.

    The serial devices by their pty's path, as a van names /dev/ttyACM0: "sim:..." ports
    would make the factory take them for a simulated van on a virtual clock and leave out
    the GPS timing thread (drivers/gps.py) that every van runs. The NO2 sheet in the
    sensor's table, as a van has it: without one the simulated sheet comes from the
    simulator, which loads numpy (~20 MB) that a van without a microphone never loads.
    """
    noise = ({"driver": "microphone", "device": "sim"} if kind == "mic"
             else {"driver": "sound-module", "bus": "sim"})
    return {
        "pm": {"driver": "pms5003", "port": ports["pm"], "mode": "passive"},
        "gps": {"driver": "nmea-gps", "port": ports["gps"]},
        "no2": {"driver": "no2-b43f", "bus": "sim", "serial": no2_sheet["serial"], "calibration": no2_sheet},
        "noise": noise,
    }


def van(kind: str, device: str, data_dir: Path, uplink: dict[str, Any], seconds: float,
        warmup: float, nmea_mix: Path | None, no2_sheet: dict[str, Any]) -> dict[str, Any]:
    """Run one van; its CPU seconds over ``seconds`` after ``warmup``, RSS, what it did."""
    import edge.cli  # noqa: F401  what `edge run` has loaded: its RSS is the van's
    import edge.runtime  # noqa: F401
    from buffer.store import Buffer
    from edge.agent import Agent
    from core.clock import SystemClock
    from edge.config import UplinkConfig, parse_config
    from edge.driver_factory import build_drivers
    from uplink.mqtt import MqttLink

    rng = random.Random(7)
    clock = SystemClock()
    devices = None
    if kind == "values":
        # Only here: the value simulator loads numpy, which a van without a microphone does not.
        from simulator.value_sensors import SIM_DRIVERS
        from simulator.world import VanWorld

        cfg = parse_config({"device": {"id": device, "data_dir": str(data_dir)}})
        world = VanWorld(clock, shift_start_utc=time.time())
        drivers = [SIM_DRIVERS[k](world) for k in ("sim-pm", "sim-no2", "sim-noise", "sim-gps")]
    else:
        ports_json = data_dir.parent / f"{device}-ports.json"
        cmd = [sys.executable, "-m", "simulator.pty_devices", "--json", str(ports_json)]
        devices = subprocess.Popen(cmd + (["--nmea-mix", str(nmea_mix)] if nmea_mix else []))
        while not ports_json.exists():
            time.sleep(0.05)
        hw = _Bus(rng, _PacedMicrophone(rng) if kind == "mic" else None)
        hw.ports = json.loads(ports_json.read_text())
        cfg = parse_config({"device": {"id": device, "data_dir": str(data_dir)}, "sensors": _sensors(kind, hw.ports, no2_sheet)})
        drivers = build_drivers(cfg.sensors, {"clock": clock, "hardware": hw})
    cfg.uplink = UplinkConfig(**uplink)
    link = MqttLink(cfg.uplink, device)
    received = record_received(link)
    agent = Agent(cfg, drivers, clock, Buffer(cfg.buffer_path, device), link)
    parts = _time_parts(agent) if os.environ.get("BENCH_AGENT_PARTS") else None
    marks: dict[str, float] = {}

    threads: dict[str, dict[str, float]] = {}

    def mark(name: str) -> None:
        marks[name] = _cpu()
        marks[name + "_taken"] = agent.stats.taken
        if parts is not None:
            threads[name + "_parts"] = dict(parts)
        threads[name] = _thread_cpu()

    # The warm-up leaves out one-off costs (imports, opening ports, the sensors' set-up
    # commands, connecting, the first clock check) that an agent running for years does
    # not repeat.
    threading.Timer(warmup, mark, ("c0",)).start()
    threading.Timer(warmup + seconds, lambda: (mark("c1"), agent.request_stop())).start()
    link.start()
    # BENCH_AGENT_PROFILE=DIR: a cProfile of the van's main thread (the agent loop, ~95 % of
    # its CPU) to DIR/<device>.prof, warm-up included: where each CPU-s goes (issue #18).
    prof_dir = os.environ.get("BENCH_AGENT_PROFILE")
    profiler = None
    if prof_dir:
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU, not wall time: the VM is shared
        profiler.enable()
    try:
        agent.run()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(prof_dir) / f"{device}.prof"))
        link.stop()
        for d in drivers:
            d.close()
        if devices is not None:
            devices.terminate()
            devices.wait(10)
    return {
        "kind": kind, "cpu_s": marks["c1"] - marks["c0"], "rss_mb": _rss_mb(),
        "taken": int(marks["c1_taken"] - marks["c0_taken"]),
        "time_source": str(agent.timekeeper.stamp().source),
        "published": agent.stats.published, "acked": agent.stats.acked_batches,
        "heartbeats": agent.stats.heartbeats, "connects": link.counters["connects"],
        "threads": {k: round(v - threads["c0"].get(k, 0.0), 2) for k, v in threads["c1"].items()},
        "rss_parts": _rss_parts() if parts is not None else None,
        "parts": None if parts is None else {
            k: round(v - threads["c0_parts"].get(k, 0.0), 4) for k, v in threads["c1_parts"].items()},
        "received": [(t, list(p)) for t, p in received],
    }


def _time_parts(agent: Any) -> dict[str, float]:
    """BENCH_AGENT_PARTS=1: the loop thread's CPU seconds per part of a tick (time.thread_time).

    Wraps each driver's read and the tick's steps; costs ~1 µs a call, unlike a
    profiler, which multiplies the cost of small Python functions (issue #18: where
    each CPU-s goes).
    """
    acc: dict[str, float] = {}

    def wrap(obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + time.thread_time() - t0

        setattr(obj, attr, timed)

    for d in agent.drivers:
        wrap(d, "read", f"read {d.name}")
    for step in ("tick", "commit", "maybe_seal", "pump"):
        wrap(agent, step, step)
    wrap(agent.timekeeper, "update", "timekeeper.update")
    wrap(agent.buffer, "housekeep", "buffer.housekeep")
    return acc


def record_received(link: Any) -> list[tuple[str, bytes]]:
    """Every message the van's link receives (its acks) as (topic, payload), for the byte
    count of issue #18: the receiver's answers travel on the van's link too. The sniffer
    cannot see them (a van's account is its client id: a second client would take the
    van's session over), so the van records them as they reach it."""
    received: list[tuple[str, bytes]] = []
    handler = link._client.on_message

    def recording(client: Any, userdata: Any, msg: Any) -> None:
        received.append((msg.topic, bytes(msg.payload)))
        handler(client, userdata, msg)

    link._client.on_message = recording
    return received


# -- the harness -----------------------------------------------------------------------

def _receiver(spec: str) -> None:
    """The real receiver (store, validate, ack) in a process of its own: not the van's CPU.

    Runs until SIGTERM; ``spec``: its ReceiverConfig as JSON.
    """
    import signal

    from receiver.config import ReceiverConfig
    from receiver.mqtt_consumer import ReceiverService

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    svc = ReceiverService(ReceiverConfig(**json.loads(spec)))
    svc.start()
    stop.wait()
    svc.stop()


def _uplink_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class Sniffer:
    """Every batch, heartbeat and sync request the vans publish, as the broker delivers them.

    Subscribes with the receiver's account (the ACL lets it read batch, status and sync
    topics) under its own client id, QoS 0: it watches, it never acknowledges. The acks
    cannot be watched so (a van's account is its client id: a second client would take
    the van's session over); each van records those it receives (``van``).
    """

    def __init__(self, rx_cfg: Any, prefix: str = "datalab/v1", topics: tuple[str, ...] = ("batch", "status", "sync"),
                 client_id: str = "bench-sniffer") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        c.username_pw_set(rx_cfg.username, rx_cfg.password)
        c.tls_set(ca_certs=rx_cfg.ca_file)
        self.subscribed = threading.Event()
        c.on_connect = lambda cl, *_: cl.subscribe([(f"{prefix}/+/{t}", 0) for t in topics])
        c.on_subscribe = lambda *_: self.subscribed.set()
        c.on_message = lambda cl, ud, msg: self.messages.append((msg.topic, bytes(msg.payload)))
        c.connect(rx_cfg.host, rx_cfg.port)
        c.loop_start()
        self._client = c
        if not self.subscribed.wait(15):
            raise RuntimeError("sniffer could not subscribe")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def measure(seconds: float = 120.0, repeats: int = 1, warmup: float = 15.0,
            nmea_mix: Path | None = NMEA_MIX, kinds: tuple[str, ...] = KINDS,
            captured: list[tuple[str, bytes]] | None = None, raw: list[dict] | None = None) -> list[dict]:
    """Rows (with all three kinds); the vans' uploads appended to ``captured``, each van's
    own result to ``raw`` if given (a run of some kinds only gives no rows)."""
    from simulator.broker import LocalBroker, SecureSetup
    from simulator.hardware import SIM_NO2_CAL

    # The simulated NO2 board's sheet, handed to each van as its configuration (_sensors).
    no2_sheet = {k: v for k, v in dataclasses.asdict(SIM_NO2_CAL).items() if v is not None}

    if nmea_mix is not None and not nmea_mix.exists():
        nmea_mix = None  # a clone without ../shared: our own 7-sentence epochs
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    names = [f"van-{k}-{i}" for i in range(repeats) for k in kinds]
    broker = LocalBroker("mosquitto", workdir=tmp / "broker", secure=SecureSetup(devices=tuple(names)))
    (tmp / "broker").mkdir()
    broker.start()
    rx_spec = json.dumps(dataclasses.asdict(broker.receiver_config(str(tmp / "store.sqlite"))))
    rx = subprocess.Popen([sys.executable, "-m", "bench.bench_agent", "--receiver", rx_spec])
    sniffer = Sniffer(broker.receiver_config(""))
    results: list[dict[str, Any]] = []
    try:
        for i in range(repeats):
            # The three vans at once, each its own process: CPU time is per process, so
            # they do not add to each other's figure, and the run takes minutes, not ten.
            procs = []
            for kind in kinds:
                name = f"van-{kind}-{i}"
                out = tmp / f"{name}.json"
                args = json.dumps({"kind": kind, "device": name, "data_dir": str(tmp / name),
                                   "uplink": _uplink_dict(broker.uplink_config(name)),
                                   "seconds": seconds, "warmup": warmup,
                                   "nmea_mix": str(nmea_mix) if nmea_mix else None, "out": str(out),
                                   "no2_sheet": no2_sheet})
                procs.append((subprocess.Popen([sys.executable, "-m", "bench.bench_agent", "--child", args]), out))
            for p, out in procs:
                if p.wait(timeout=warmup + seconds + 120) != 0:
                    raise RuntimeError(f"bench van exited with {p.returncode}")
                results.append(json.loads(out.read_text()))
        if raw is not None:
            raw.extend(results)
    finally:
        sniffer.stop()
        if captured is not None:
            captured.extend(sniffer.messages)
            for r in results:  # what each van received from the receiver (acks), as it recorded it
                captured.extend((t, bytes(n)) for t, n in r.get("received", []))
        rx.terminate()
        rx.wait(30)
        broker.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return rows(results, seconds, repeats, nmea_mix) if set(kinds) == set(KINDS) else []


def rows(results: list[dict[str, Any]], seconds: float, repeats: int, nmea_mix: Path | None) -> list[dict]:
    hour = 3600.0 / seconds
    by = {k: [r for r in results if r["kind"] == k] for k in KINDS}
    best = {k: min(v, key=lambda r: r["cpu_s"]) for k, v in by.items()}
    # A figure for the shipped configuration or none: untrusted time or no acks means
    # the run was not what the row says (a run shorter than a batch age, a broken link).
    shipped = all(r["time_source"] != "unsync" and r["acked"] >= 1 for r in results)
    runs = {k: ", ".join(f"{r['cpu_s'] * hour:.2f}" for r in v) for k, v in by.items()}
    mix = f"GPS {nmea_mix.name} sentence mix" if nmea_mix else "GPS 7 synthetic sentences/s"
    common = ("" if shipped else "NOT THE SHIPPED CONFIGURATION (no acks or untrusted time): ") + (
              f"connected over TLS to Mosquitto (shipped config, device account), receiver acking; "
              f"60-s batches by age, heartbeats; {mix}; noisy inputs; "
              f"best of {repeats} run(s) of {seconds:.0f} s after warm-up")

    def detail(r: dict[str, Any]) -> str:
        return (f"{r['taken']} samples, {r['published']} batches sent, {r['acked']} acked, "
                f"{r['heartbeats']} heartbeats, time {r['time_source']}")

    m, mic, v = best["module"], best["mic"], best["values"]
    return [
        {"name": "agent CPU per van-hour: PM, NO2, sound module, GPS 1 Hz", "value": round(m["cpu_s"] * hour, 2),
         "unit": "CPU-s", "baseline": round(v["cpu_s"] * hour, 2),
         "baseline_name": "same connected agent, value-level sensors",
         "target": f"<= {TARGET_CPU_S_PER_HOUR}", "ok": shipped and m["cpu_s"] * hour <= TARGET_CPU_S_PER_HOUR,
         "note": f"{common}; runs {runs['module']}; {detail(m)}; baseline runs {runs['values']}, {detail(v)}"},
        {"name": "agent CPU per van-hour: microphone van (48 kHz metering in place of the module)",
         "value": round(mic["cpu_s"] * hour, 2), "unit": "CPU-s", "baseline": round(v["cpu_s"] * hour, 2),
         "baseline_name": "same connected agent, value-level sensors", "target": None, "ok": None,
         "note": f"{common}; runs {runs['mic']}; {detail(mic)}"},
        {"name": "agent RSS: microphone van", "value": round(mic["rss_mb"], 1), "unit": "MB",
         "baseline": round(v["rss_mb"], 1), "baseline_name": "value-level van",
         "target": f"< {TARGET_RSS_MB:.0f}", "ok": mic["rss_mb"] < TARGET_RSS_MB,
         "note": f"VmRSS at the end of the run; module van {m['rss_mb']:.1f} MB"},
    ]


def run() -> list[dict]:
    return measure(float(os.environ.get("BENCH_AGENT_SECONDS", "120")))


def _child(spec: str) -> None:
    a = json.loads(spec)
    Path(a["data_dir"]).mkdir(parents=True, exist_ok=True)
    result = van(a["kind"], a["device"], Path(a["data_dir"]), a["uplink"], a["seconds"], a["warmup"],
                 Path(a["nmea_mix"]) if a["nmea_mix"] else None, a["no2_sheet"])
    Path(a["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("seconds", nargs="?", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.receiver:
        _receiver(ns.receiver)
    elif ns.child:
        _child(ns.child)
    else:
        from bench import print_table

        print_table(measure(ns.seconds, ns.repeats))
