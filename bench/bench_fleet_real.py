"""The fleet for real (issue 18 point 4): one TLS connection and one account per van, durable PostgreSQL.

    python -m bench.bench_fleet_real --vans 1000 --minutes 2 --agents 0

* Mosquitto runs the shipped config (LocalBroker secure mode: TLS device listener, password
  accounts, the shipped ACL); every van has its own account, added in one write and a SIGHUP.
* ``--vans`` simulated vans (simulator/async_fleet.py, aiomqtt, one connection each) send
  real wire-format batches of 1 Hz samples, one per 60 s, staggered over the minute.
* ``--agents`` real edge agents (bench/bench_agent.py's van: real drivers over simulated
  serial/I2C devices, its own process, its own account) beside them.
* The real receiver (ReceiverService, shipped defaults, acks after commit, derive=separate)
  into a throwaway PostgreSQL cluster with fsync, synchronous_commit and full_page_writes ON.
* ``datalab-receiver derive --follow`` runs during the load, as it would in service.

Report: upload->stored lag p50/p99 (PUBLISH to the committed ack), CPU per component from
/proc (broker, receiver, deriver, PostgreSQL, fleet clients, agents), the derive backlog every
``--sample-s`` seconds, and the oracle: every batch sent is stored exactly once, and every
sample of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "max_connections": "200"}
TARGET_P99_S = 2.0


def raise_fd_limit(want: int) -> int:
    """Mosquitto holds one fd per van (and inherits ours): as high as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, and the reaped children's cutime, cstime (PostgreSQL's backends)
    return sum(int(x) for x in parts[11:15]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per component; a component is a set of pids found again at every read,
    each pid's figure kept at its last value so a process that ends still counts."""

    def __init__(self, components: dict[str, Any]) -> None:
        self.components = components  # name -> callable returning pids
        self.seen: dict[str, dict[int, float]] = {k: {} for k in components}
        self.base: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.components.items():
            for pid in pids():
                v = _cpu_s(pid)
                if v:
                    self.seen[name][pid] = v
            out[name] = sum(self.seen[name].values())
        return out

    def start(self) -> None:
        self.base = self.read()

    def since_start(self) -> dict[str, float]:
        now = self.read()
        return {k: round(now[k] - self.base.get(k, 0.0), 1) for k in now}


def _pg_pids(cluster: Any) -> list[int]:
    try:
        return cluster._server_pids()
    except (OSError, ValueError):
        return []


def run(vans: int = 200, minutes: float = 1.0, agents: int = 0, *, sample_s: float = 30.0,
        client_procs: int = 1, intruder: bool = False, workdir: Path | None = None, interval_s: int = 60,
        log: Any = print) -> dict[str, Any]:
    from receiver.config import ReceiverConfig
    from receiver.provision import RECEIVER_USER
    from receiver.store_factory import open_store
    from simulator.async_fleet import FleetSpec, write_accounts
    from simulator.broker import LocalBroker, SecureSetup
    from tests.pg import PgCluster

    fds = raise_fd_limit(vans + agents + 4096)
    if fds < vans + 200:
        raise RuntimeError(f"open-file limit {fds} is too low for {vans} connections (raise the hard limit)")
    tmp = workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-real-"))
    seconds = minutes * 60.0
    cluster = PgCluster(settings=DURABLE).start()
    broker = LocalBroker("mosquitto", workdir=tmp / "broker", persistence=False,
                         secure=SecureSetup(devices=("probe-van",)),  # the file exists; the fleet is added below
                         extra_config="max_queued_messages 100000\nmax_inflight_messages 100")
    (tmp / "broker").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    rx = deriver = None
    try:
        broker.start()
        info = broker.secure_info
        assert info is not None and broker.proc is not None
        store_url = cluster.create_database("fleet")
        made = open_store(store_url)  # the schema, before ingest and derive race to make it
        schema = made.schema  # type: ignore[attr-defined]
        made.close()
        sim = [f"fv-{i:05d}" for i in range(vans)]
        real = [f"ag-{i:03d}" for i in range(agents)]
        passwords = write_accounts(info.conf_dir / "devices.passwd", sim + real)
        os.kill(broker.proc.pid, signal.SIGHUP)  # Mosquitto reads the password file again
        time.sleep(1.0)
        accounts = tmp / "accounts.json"
        accounts.write_text(json.dumps(passwords))
        os.chmod(accounts, 0o600)

        rx_cfg = broker.receiver_config(store_url, derive="separate", health_file=str(tmp / "rx-health.json"))
        rx = subprocess.Popen([sys.executable, "-m", "bench.bench_agent", "--receiver",
                               json.dumps(dataclasses.asdict(rx_cfg))],
                              stdout=open(tmp / "rx.log", "wb"), stderr=subprocess.STDOUT)
        _wait_connected(tmp / "rx-health.json", rx)
        deriver = subprocess.Popen([sys.executable, "-m", "receiver.cli", "derive", "--store", store_url,
                                    "--follow", "--interval", "0.5"],
                                   stdout=open(tmp / "derive.log", "wb"), stderr=subprocess.STDOUT)
        # Real agents first: they need a while to open their devices.
        agent_outs = []
        for name in real:
            out = tmp / f"{name}.json"
            uplink = {"host": broker.host, "port": info.device_port, "tls": True, "ca_file": info.ca_file,
                      "username": name, "password": passwords[name]}
            spec = {"kind": "module", "device": name, "data_dir": str(tmp / name), "uplink": uplink,
                    "seconds": seconds, "warmup": 20.0, "nmea_mix": None, "out": str(out)}
            p = subprocess.Popen([sys.executable, "-m", "bench.bench_agent", "--child", json.dumps(spec)],
                                 stdout=open(tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
            procs.append(p)
            agent_outs.append((p, out))
        agent_pids = [p.pid for p, _ in agent_outs]

        start_wall = time.time() + 5.0 + vans / 400.0  # time for every van's TLS handshake
        fleet_outs = []
        fleet_pids: list[int] = []
        per = -(-vans // max(1, client_procs)) if vans else 0
        for i in range(client_procs if vans else 0):
            devs = sim[i * per:(i + 1) * per]
            if not devs:
                continue
            spec_path = tmp / f"fleet{i}.spec.json"
            out = tmp / f"fleet{i}.json"
            spec_path.write_text(json.dumps(dataclasses.asdict(FleetSpec(
                host=broker.host, port=info.device_port, ca_file=info.ca_file, accounts_file=str(accounts),
                devices=devs, seconds=seconds, interval_s=interval_s, start_wall=start_wall, out=str(out),
                seed=i + 1, intruder=devs[0] if (intruder and i == 0 and len(devs) > 1) else ""))))
            p = subprocess.Popen([sys.executable, "-m", "simulator.async_fleet", str(spec_path)],
                                 stdout=open(tmp / f"fleet{i}.log", "wb"), stderr=subprocess.STDOUT)
            procs.append(p)
            fleet_pids.append(p.pid)
            fleet_outs.append((p, out))

        meter = CpuMeter({
            "broker": lambda: [broker.proc.pid],  # type: ignore[union-attr]
            "receiver": lambda: [rx.pid],  # type: ignore[union-attr]
            "deriver": lambda: [deriver.pid],  # type: ignore[union-attr]
            "postgresql": lambda: _pg_pids(cluster),
            "fleet clients": lambda: fleet_pids,
            "agents": lambda: agent_pids,
        })
        # The load starts when every fleet process has its vans connected (a connection storm
        # of thousands of TLS handshakes is not lag); the vans then start at that time.
        while not all(Path(str(out) + ".started").exists() or p.poll() is not None for p, out in fleet_outs):
            time.sleep(0.2)
        starts = [float(Path(str(out) + ".started").read_text()) for _, out in fleet_outs
                  if Path(str(out) + ".started").exists()]
        connect_s = round(max(starts, default=time.time()) - start_wall, 1)
        time.sleep(max(0.0, max(starts, default=start_wall) - time.time()))
        meter.start()
        backlog_rows: list[dict[str, Any]] = []
        # The bench's own look at the store: autocommit, so it never sits idle in a transaction
        # holding locks that the receiver's or deriver's DDL (partitions) would queue behind.
        import psycopg
        import psycopg.sql

        store = psycopg.connect(store_url, autocommit=True)
        store.execute(psycopg.sql.SQL("SET search_path TO {}, public").format(psycopg.sql.Identifier(schema)))
        store.execute("SET statement_timeout = '20s'")  # a look that cannot answer must not stop the bench
        t0 = time.monotonic()

        def sample() -> None:
            row = {"t_s": round(time.monotonic() - t0), "derive_backlog": _backlog(store),
                   "stored_batches": _stored_batches(store)}
            backlog_rows.append(row)
            log(f"  t={row['t_s']:>5} s  stored {row['stored_batches']:>7} batches, derive backlog "
                f"{row['derive_backlog']:>6}")

        next_sample = sample_s
        while any(p.poll() is None for p, _ in fleet_outs + agent_outs):
            time.sleep(0.5)
            meter.read()  # a process's CPU is readable only while it lives
            if time.monotonic() - t0 >= next_sample:
                sample()
                next_sample += sample_s
            if time.monotonic() - t0 > seconds + 300:
                raise RuntimeError("the fleet did not finish within 5 minutes of its end")
        elapsed = time.monotonic() - t0
        cpu = meter.since_start()
        sample()  # backlog when the load ends
        catchup = None
        t_end = time.monotonic()
        while time.monotonic() - t_end < 60:
            if _backlog(store) == 0:
                catchup = round(time.monotonic() - t_end, 1)
                break
            time.sleep(0.5)
        # The oracle counts what is lost, not what is late: the receiver may still be working
        # through batches the broker holds for it. Wait until storing stops (10 s without a new one).
        settled, last, t_set = time.monotonic(), -1, time.monotonic()
        while time.monotonic() - t_set < 300:
            n = _stored_batches(store)
            if n != last:
                last, settled = n, time.monotonic()
            elif time.monotonic() - settled > 10:
                break
            time.sleep(1.0)
        drain_s = round(settled - t_end, 1)
        sims = [r for _, out in fleet_outs for r in json.loads(out.read_text())]
        agent_res = {name: json.loads(out.read_text()) for name, (_, out) in zip(real, agent_outs)}
        oracle = _oracle(store, sims)
        intruded = _count(store, "SELECT count(*) FROM samples WHERE epoch = %s", ("intruder",))
        agents_doubled = _count(
            store, "SELECT count(*) - count(DISTINCT (device, epoch, seq)) FROM samples WHERE device LIKE 'ag-%%'")
        store.close()
    finally:
        for p in procs + [x for x in (deriver, rx) if x is not None]:
            if p.poll() is None:
                p.terminate()
        for p in procs + [x for x in (deriver, rx) if x is not None]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.close()
        cluster.stop()
        if workdir is None:  # ours: a run leaves nothing behind (accounts and passwords are in it)
            shutil.rmtree(tmp, ignore_errors=True)
    lags = sorted(x for r in sims for x in r["lags"])
    q = (lambda p: round(lags[min(len(lags) - 1, int(p * len(lags)))], 3) if lags else None)
    return {
        "vans": vans, "agents": agents, "minutes": minutes, "elapsed_s": round(elapsed, 1),
        "connect_errors": sum(1 for r in sims if r["connect_error"]), "connect_s": connect_s,
        "van_errors": sum(1 for r in sims if r["error"]),
        "published": sum(r["published"] for r in sims), "acked": sum(r["acked"] for r in sims),
        "lag_p50_s": q(0.5), "lag_p99_s": q(0.99), "lag_max_s": q(1.0),
        "cpu_s": cpu, "cpu_share": {k: round(v / elapsed, 3) for k, v in cpu.items()},
        "backlog": backlog_rows, "derive_catchup_s": catchup, "store_drain_s": drain_s,
        "oracle": oracle, "intruder_rows": intruded,
        "agents_published": sum(a["published"] for a in agent_res.values()),
        "agents_acked": sum(a["acked"] for a in agent_res.values()), "agents_doubled_rows": agents_doubled,
        "fd_limit": fds,
    }


def _wait_connected(health: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the receiver's health file says it is subscribed (a batch before that would wait)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        try:
            h = json.loads(health.read_text())
            if h.get("broker", {}).get("state") == "connected":
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the receiver did not connect to the broker")


def _count(store: Any, sql: str, args: tuple[Any, ...] = ()) -> int:
    row = store.execute(sql, args).fetchone()
    return int(row[0] or 0)


def _backlog(store: Any) -> int:
    return _count(store, "SELECT count(*) FROM derive_queue")


def _stored_batches(store: Any) -> int:
    return _count(store, "SELECT count(*) FROM batches")


def _oracle(store: Any, sims: list[dict[str, Any]]) -> dict[str, int]:
    """Every sample every simulated van sent is stored, none twice; every batch acked committed."""
    have = {(d, e): (n, nd, mx) for d, e, n, nd, mx in store.execute(
        "SELECT device, epoch, count(*), count(DISTINCT seq), max(seq) FROM samples "
        "WHERE device LIKE 'fv-%%' GROUP BY device, epoch").fetchall()}
    missing = doubled = 0
    for r in sims:
        n, nd, _ = have.get((r["device"], r["epoch"]), (0, 0, 0))
        missing += max(0, r["last_seq"] - nd)
        doubled += n - nd
    return {"missing_samples": missing, "doubled_samples": doubled,
            "unacked_batches": sum(r["published"] - r["acked"] for r in sims)}


def report(res: dict[str, Any]) -> str:
    o = res["oracle"]
    lines = [
        f"fleet: {res['vans']} simulated vans (own TLS connection + account each) + {res['agents']} real agents, "
        f"{res['minutes']} min, durable PostgreSQL (fsync/synchronous_commit/full_page_writes on)",
        f"  batches published {res['published']}, acked {res['acked']}, connect errors {res['connect_errors']}, "
        f"vans ended by an error {res['van_errors']}; connecting took {res['connect_s']} s past the planned start",
        f"  upload->stored lag p50 {res['lag_p50_s']} s, p99 {res['lag_p99_s']} s (target < {TARGET_P99_S}), "
        f"max {res['lag_max_s']} s",
        "  CPU-s (share of one core): " + ", ".join(
            f"{k} {v} ({res['cpu_share'][k]})" for k, v in res["cpu_s"].items()),
        f"  derive backlog at the end {res['backlog'][-1]['derive_backlog'] if res['backlog'] else '?'} batches, "
        f"caught up after {res['derive_catchup_s']} s (None: not within 60 s); the receiver stored its last "
        f"batch {res['store_drain_s']} s after the load ended",
        f"  oracle: missing {o['missing_samples']} samples, doubled {o['doubled_samples']}, "
        f"unacked batches {o['unacked_batches']}; agents published {res['agents_published']}, acked "
        f"{res['agents_acked']}, doubled rows {res['agents_doubled_rows']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vans", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--agents", type=int, default=0)
    ap.add_argument("--sample-s", type=float, default=30.0, help="a derive-backlog row every so many seconds")
    ap.add_argument("--client-procs", type=int, default=1, help="processes the simulated vans are spread over")
    ap.add_argument("--json", help="also write the result here")
    ns = ap.parse_args()
    result = run(ns.vans, ns.minutes, ns.agents, sample_s=ns.sample_s, client_procs=ns.client_procs)
    print(report(result))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1))
