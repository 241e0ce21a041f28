"""``edge selftest``: is this van fit to measure? One table, one exit code.

Checks: every configured sensor answers with plausible values; GPS fix and satellites;
the clock is trusted (GPS or NTP); the buffer is writable (size, backlog); the broker
accepts the device's own credentials; disk space; CPU temperature.
Exit code: 0 all passed (warnings allowed), 1 a check failed, 2 configuration error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edge.config import AgentConfig, UplinkConfig
from core.errors import ConfigError, RecoverableError
from edge.technician.cli_support import EXIT_FAIL, EXIT_OK, Van, console, handle_errors, load_van_config, van_options

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
CHECKS = ("sensors", "gps", "clock", "buffer", "broker", "disk", "cpu")
_STYLE = {PASS: "[green]✓ PASS[/]", WARN: "[yellow]! WARN[/]", FAIL: "[bold red]✗ FAIL[/]", SKIP: "[dim]- SKIP[/]"}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str
    detail: str


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def plausible(values: dict[str, Any]) -> str | None:
    """None if the values look like a working sensor, else what is wrong.

    Wide limits on purpose: the question is "wired and alive", not "calibrated".
    """
    limits = {
        "pm25": (0, 1000), "pm10": (0, 2000), "pm1": (0, 1000), "no2_ppb": (-50, 2000),
        "no2_we_mv": (5, 3000), "no2_ae_mv": (5, 3000), "no2_temp_c": (-30, 70), "laeq": (20, 140),
        "lceq": (20, 140), "lzeq": (20, 140),
        "lat": (-90, 90), "lon": (-180, 180),
    }
    for k, (lo, hi) in limits.items():
        if k in values:
            v = _num(values[k])
            if v is None or not lo <= v <= hi:
                return f"{k} = {values[k]!r} outside {lo}..{hi}"
    pm25, pm10 = _num(values.get("pm25")), _num(values.get("pm10"))
    if pm25 is not None and pm10 is not None and pm10 + 1 < pm25:
        return f"pm10 {pm10} below pm25 {pm25}"
    return None


def _summary(values: dict[str, Any]) -> str:
    keys = [k for k in ("pm25", "pm10", "no2_ppb", "no2_we_mv", "no2_ae_mv", "no2_temp_c", "laeq", "lceq", "lzeq", "lat", "lon",
                        "sats_used") if k in values] or list(values)[:4]
    return ", ".join(f"{k} {values[k]:.4g}" if _num(values[k]) is not None else f"{k} {values[k]}" for k in keys)


def _has_fix(values: dict[str, Any]) -> bool:
    return _num(values.get("lat")) is not None and bool(values.get("fix_quality", 1))


def check_sensors(van: Van, seconds: float, want_gps: bool) -> tuple[list[Check], Any]:
    """Read every sensor once a second until each gave a good reading (or time is up)."""
    from core.timekeeping import TimeFixSource, TimeKeeper

    tk = TimeKeeper(van.clock, [d for d in van.drivers if isinstance(d, TimeFixSource)],
                    gps_valid_s=van.cfg.time.gps_valid_s)
    good: dict[str, Any] = {}
    last: dict[str, Any] = {}
    errors: dict[str, str] = {}
    start = van.clock.monotonic()
    while van.clock.monotonic() - start < seconds:
        tk.update()
        for d in van.drivers:
            try:
                r = d.read()
            except RecoverableError as exc:
                errors[d.name] = str(exc)
                continue
            except Exception as exc:  # a driver bug is a failed check, not a crashed tool
                errors[d.name] = f"{type(exc).__name__}: {exc}"
                continue
            if r is None:
                continue
            last[d.name] = r
            is_gps = r.sensor == "gps"
            if "warming_up" not in r.flags and plausible(r.values) is None and (not is_gps or _has_fix(r.values)):
                good[d.name] = r
        if len(good) == len(van.drivers):
            break
        van.wait(1.0)
    tk.update()
    out: list[Check] = []
    for d in van.drivers:
        r = good.get(d.name) or last.get(d.name)
        if r is not None and r.sensor == "gps":
            if not want_gps:
                continue
            v = r.values
            sats = _num(v.get("sats_used"))
            if d.name in good:
                status = PASS if sats is None or sats >= 4 else WARN
                out.append(Check(f"gps {d.name}", status, f"fix {v['lat']:.5f}, {v['lon']:.5f}, "
                                 f"{int(sats) if sats is not None else '?'} satellites, HDOP {v.get('hdop', '?')}"))
            else:
                out.append(Check(f"gps {d.name}", FAIL, f"answers but no fix after {seconds:g} s "
                                 "(sky view? antenna? a cold start needs a few minutes)"))
            continue
        if d.name in good:
            out.append(Check(f"sensor {d.name}", PASS, _summary(good[d.name].values)))
        elif r is not None:
            why = "still warming up" if "warming_up" in r.flags else plausible(r.values)
            out.append(Check(f"sensor {d.name}", FAIL, f"answers, but {why}"))
        else:
            out.append(Check(f"sensor {d.name}", FAIL, errors.get(d.name, f"no reading in {seconds:g} s")
                             + " (wiring? power? the port in the config?)"))
    return out, tk


def check_clock(tk: Any) -> Check:
    st = tk.stamp()
    if st.source.trusted:
        return Check("clock", PASS, f"trusted ({st.source}), {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(st.t_utc_ms / 1000))} UTC")
    return Check("clock", FAIL, "not trusted: no GPS time and NTP not synchronised (samples will wait to be corrected)")


def check_buffer(cfg: AgentConfig) -> Check:
    data = Path(cfg.device.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
        probe = data / f".selftest-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        return Check("buffer", FAIL, f"{data} is not writable: {exc.strerror or exc}")
    if not cfg.buffer_path.exists():
        return Check("buffer", PASS, f"{data} writable; no buffer yet (made at the agent's first start)")
    from buffer.store import Buffer

    try:
        # No integrity check here: that reads the whole file, and the agent does it at start.
        buf = Buffer(cfg.buffer_path, cfg.device.id, max_bytes=cfg.buffer.max_bytes, check_on_open=False,
                     wal_autocheckpoint=cfg.buffer.wal_autocheckpoint, reserve_bytes=cfg.buffer.reserve_bytes,
                     quarantine_dir=cfg.buffer.quarantine_dir or None)
        try:
            st = buf.stats()
        finally:
            buf.close()
    except Exception as exc:
        return Check("buffer", FAIL, f"cannot open {cfg.buffer_path}: {exc}")
    pct = 100.0 * st.file_bytes / cfg.buffer.max_bytes
    detail = (f"{st.file_bytes / 2**20:.1f} MiB ({pct:.0f} % of cap), backlog {st.backlog_samples} samples "
              f"in {st.batches} batches, {st.samples_dropped} dropped")
    return Check("buffer", WARN if pct > 80 else PASS, detail)


def check_broker(uc: UplinkConfig, device_id: str, timeout_s: float = 5.0) -> Check:
    """Connect with the device's own credentials, then disconnect cleanly (no last will fires)."""
    import paho.mqtt.client as mqtt

    where = f"{uc.host}:{uc.port}" + (" (TLS)" if uc.tls else "")
    # clean_session=False: a broker that makes the username the client id (ours does) must
    # not wipe the agent's persistent session because of a test.
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"{device_id}-selftest",
                    clean_session=False, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    if uc.username:
        c.username_pw_set(uc.username, uc.password or None)
    result: dict[str, Any] = {}
    c.on_connect = lambda _c, _u, _f, rc, _p=None: result.setdefault("rc", rc)
    try:
        if uc.tls:
            c.tls_set(ca_certs=uc.ca_file or None, certfile=uc.cert_file or None, keyfile=uc.key_file or None,
                      cert_reqs=ssl.CERT_REQUIRED)
        c.connect(uc.host, uc.port, keepalive=max(5, uc.keepalive_s))
        deadline = time.monotonic() + timeout_s
        while "rc" not in result and time.monotonic() < deadline:
            if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Check("broker", FAIL, f"{where} unreachable: {exc}")
    finally:
        try:
            c.disconnect()
        except Exception:
            pass
    rc = result.get("rc")
    if rc is None:
        return Check("broker", FAIL, f"{where}: no answer within {timeout_s:g} s")
    if getattr(rc, "is_failure", False):
        return Check("broker", FAIL, f"{where} refused the connection: {rc} (username/password/certificate?)")
    return Check("broker", PASS, f"{where} accepted {uc.username or 'anonymous'}")


def check_disk(cfg: AgentConfig) -> Check:
    try:
        free = shutil.disk_usage(cfg.device.data_dir).free
    except OSError as exc:
        return Check("disk", FAIL, str(exc))
    mib = free / 2**20
    if free < cfg.buffer.reserve_bytes + 16 * 2**20:
        return Check("disk", FAIL, f"{mib:.0f} MiB free on {cfg.device.data_dir}")
    return Check("disk", WARN if free < 256 * 2**20 else PASS, f"{mib:.0f} MiB free on {cfg.device.data_dir}")


def check_cpu(read_temp: Callable[[], float | None] | None = None) -> Check:
    from edge.agent import _cpu_temp_c

    t = (read_temp or _cpu_temp_c)()
    if t is None:
        return Check("cpu", SKIP, "no CPU temperature here (not a Raspberry Pi)")
    # The Pi throttles at 80-85 °C: a van in the sun with a closed box gets there.
    status = FAIL if t >= 80 else WARN if t >= 70 else PASS
    return Check("cpu", status, f"{t:.1f} °C")


def run_checks(cfg: AgentConfig, *, seconds: float, skip: set[str]) -> list[Check]:
    checks: list[Check] = []
    tk = None
    if not {"sensors", "gps", "clock"} <= skip:
        with Van(cfg) as van:
            if van.drivers and not ({"sensors", "gps"} <= skip):
                got, tk = check_sensors(van, seconds, want_gps="gps" not in skip)
                checks += [c for c in got if not (c.name.startswith("sensor") and "sensors" in skip)]
            else:
                from core.timekeeping import TimeKeeper

                tk = TimeKeeper(van.clock)
            if "clock" not in skip:
                checks.append(check_clock(tk))
    if "buffer" not in skip:
        checks.append(check_buffer(cfg))
    if "broker" not in skip:
        checks.append(check_broker(cfg.uplink, cfg.device.id))
    if "disk" not in skip:
        checks.append(check_disk(cfg))
    if "cpu" not in skip:
        checks.append(check_cpu())
    return checks


@click.command("selftest")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(1, 900),
              help="How long to wait for sensors to warm up and GPS to fix.")
@click.option("--skip", multiple=True, type=click.Choice(CHECKS), help="Leave a check out (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable results.")
@van_options
@handle_errors
def selftest(seconds: float, skip: tuple[str, ...], as_json: bool, config_path: str | None, simulate: bool,
             data_dir: str | None) -> None:
    """Check the van: sensors, GPS, clock, buffer, broker, disk, CPU temperature.

    Exit code 0 when all checks pass (warnings allowed), 1 when one fails, 2 for a
    configuration error. The broker check connects with the van's own credentials:
    run it with the agent stopped, or --skip broker while it runs.

    \b
    Examples:
      edge selftest
      edge selftest --seconds 180            # a GPS cold start
      edge selftest --skip broker --json     # in a script, no network
      edge selftest --simulate --data-dir /tmp/van
    """
    cfg = load_van_config(config_path, simulate, data_dir)
    try:
        checks = run_checks(cfg, seconds=seconds, skip=set(skip))
    except ConfigError:
        raise
    failed = [c for c in checks if c.status == FAIL]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        t = Table(title=f"Self-test of {cfg.device.id}" + (" (simulated)" if cfg.simulation.enabled else ""))
        t.add_column("check")
        t.add_column("result")
        t.add_column("detail")
        for c in checks:
            t.add_row(c.name, _STYLE[c.status], c.detail)
        out = console()
        out.print(t)
        out.print("[green]All checks passed.[/]" if not failed else
                  f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(c.name for c in failed)}")
    raise SystemExit(EXIT_FAIL if failed else EXIT_OK)
