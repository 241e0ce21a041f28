"""v16 probe: configs `edge config check` accepts that `edge run` refuses, and the reverse.

Run: python tests/attack_v16/probe_config_agree.py [FILTER]   (uses .venv/bin/edge of this worktree)
Each case is the base config (simulated sensors, a broker that is not there) with one change.
Oracle: the documented contract (docs/technician.md): check exit 0 <=> run keeps running
(still up after RUN_S seconds, or exit 0 on SIGTERM); check exit 2 <=> run exit 2; never a traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGE = str(Path(__file__).resolve().parents[2] / ".venv/bin/edge")
RUN_S = 12.0  # the machine is shared (load ~13): a refusal took 3 s of wall time
W = Path(tempfile.mkdtemp(prefix="v16cfg"))
(W / "notadir").write_text("x")
(W / "empty.toml").write_text("")
(W / "bad.pem").write_bytes(b"\xff\xfe not a cert")
(W / "cal.toml").write_bytes(b"\x00\x01garbage = = \n")

BASE = {
    "device": {"id": '"van-v16"', "data_dir": None},
    "uplink": {"host": '"127.0.0.1"', "port": "1"},
    "sensors.pm": {"driver": '"sim-pm"'},
    "sensors.gps": {"driver": '"sim-gps"'},
    "simulation": {"enabled": "true", "speedup": "1.0"},
}


def render(cfg: dict) -> str:
    out = []
    for sect, kv in cfg.items():
        out.append(f"[{sect}]")
        out += [f"{k} = {v}" for k, v in kv.items() if v is not None]
        out.append("")
    return "\n".join(out)


def case(**changes: object) -> dict:
    cfg = {s: dict(kv) for s, kv in BASE.items()}
    for key, val in changes.items():
        sect, _, k = key.replace("__", ".").rpartition(":")
        if val is DEL:
            cfg.get(sect, {}).pop(k, None)
        else:
            cfg.setdefault(sect, {})[k] = val
    return cfg


DEL = object()
CASES: dict[str, dict] = {
    "base": case(),
    # misspelt / unknown keys
    "prot": case(**{"uplink:prot": "1883"}),
    "rate_hz_typo": case(**{"sampling:rate_hs": "1.0"}),
    "unknown_section": case(**{"samplng:rate_hz": "1.0"}),
    "sensor_opt_typo": case(**{"sensors.pm:seeed": "3"}),
    "mode_pasive": case(**{"sensors.pm:driver": '"pms5003"', "sensors.pm:port": '"/dev/null"', "sensors.pm:mode": '"pasive"'}),
    # wrong types / edge values
    "rate_str": case(**{"sampling:rate_hz": '"1"'}),
    "rate_zero": case(**{"sampling:rate_hz": "0.0"}),
    "rate_neg": case(**{"sampling:rate_hz": "-1.0"}),
    "rate_nan": case(**{"sampling:rate_hz": "nan"}),
    "rate_inf": case(**{"sampling:rate_hz": "inf"}),
    "rate_huge": case(**{"sampling:rate_hz": "1e6"}),
    "commit_zero": case(**{"sampling:commit_interval_s": "0.0"}),
    "commit_inf": case(**{"sampling:commit_interval_s": "inf"}),
    "port_big": case(**{"uplink:port": "70000"}),
    "port_bool": case(**{"uplink:port": "true"}),
    "port_float": case(**{"uplink:port": "1883.0"}),
    "window_zero": case(**{"uplink:window": "0"}),
    "keepalive_neg": case(**{"uplink:keepalive_s": "-5"}),
    "keepalive_huge": case(**{"uplink:keepalive_s": "99999999999"}),
    "ack_timeout_zero": case(**{"uplink:ack_timeout_s": "0.0"}),
    "reconnect_inverted": case(**{"uplink:reconnect_min_s": "10.0", "uplink:reconnect_max_s": "1.0"}),
    "max_bytes_small": case(**{"buffer:max_bytes": "262144"}),
    "max_bytes_tiny": case(**{"buffer:max_bytes": "1"}),
    "max_bytes_2p63": case(**{"buffer:max_bytes": "9223372036854775807"}),
    "wal_zero": case(**{"buffer:wal_autocheckpoint": "0"}),
    "reserve_neg": case(**{"buffer:reserve_bytes": "-1"}),
    "max_samples_zero": case(**{"batch:max_samples": "0"}),
    "max_samples_huge": case(**{"batch:max_samples": "100000000"}),
    "max_age_zero": case(**{"batch:max_age_s": "0.0"}),
    "heartbeat_zero": case(**{"uplink:heartbeat_s": "0.0"}),
    # identity
    "id_empty": case(**{"device:id": '""'}),
    "id_plus": case(**{"device:id": '"van+1"'}),
    "id_hash": case(**{"device:id": '"van#"'}),
    "id_slash": case(**{"device:id": '"van/1"'}),
    "id_nul": case(**{"device:id": '"van\\u0000x"'}),
    "id_long": case(**{"device:id": '"' + "v" * 5000 + '"'}),
    "id_space": case(**{"device:id": '"van 1"'}),
    "topic_prefix_wild": case(**{"uplink:topic_prefix": '"datalab/#"'}),
    # files
    "data_dir_is_file": case(**{"device:data_dir": None, "device:data_dir_file": None}),
    "tls_no_ca": case(**{"uplink:tls": "true", "uplink:ca_file": '"/nonexistent/ca.pem"'}),
    "tls_bad_ca": case(**{"uplink:tls": "true", "uplink:ca_file": None}),
    "cert_without_key": case(**{"uplink:tls": "true", "uplink:cert_file": None}),
    "quarantine_on_file": case(**{"buffer:quarantine_dir": None}),
    "no2_no_serial": case(**{"sensors.no2:driver": '"no2-b43f"', "sensors.no2:bus": "1"}),
    "no2_cal_garbage": case(**{"sensors.no2:driver": '"no2-b43f"', "sensors.no2:bus": "1",
                               "sensors.no2:serial": '"202123456"', "sensors.no2:calibration_file": None}),
    "sim_disabled_sim_sensor": case(**{"simulation:enabled": "false"}),
    "sensor_no_driver": case(**{"sensors.x:port": '"/dev/null"'}),
    "sensor_unknown_driver": case(**{"sensors.x:driver": '"pms5004"'}),
    "sensor_name_calibration": case(**{"sensors.calibration:driver": '"sim-pm"'}),
    "sensor_name_long": case(**{("sensors." + "n" * 200 + ":driver"): '"sim-pm"'}),
    "sim_speedup_neg": case(**{"simulation:speedup": "-1.0"}),
    "sim_start_bad": case(**{"simulation:start_utc": '"yesterday"'}),
    "sim_devices_bad": case(**{"simulation:devices": '"bytez"'}),
    "power_pin_big": case(**{"power:ignition_pin": "99999"}),
    "power_hours_abs": case(**{"power:hours_file": '"/proc/forbidden.json"'}),
    "panel_pin_dup": case(**{"panel:heartbeat_led_pin": "17", "panel:fault_led_pin": "17"}),
    "shift_hours_zero": case(**{"simulation:shift_hours": "0.0"}),
}


def fill(name: str, cfg: dict, d: Path) -> str:
    cfg["device"]["data_dir"] = f'"{d}/data"'
    if name == "data_dir_is_file":
        cfg["device"].pop("data_dir_file", None)
        cfg["device"]["data_dir"] = f'"{W}/notadir"'
    if name == "tls_bad_ca":
        cfg["uplink"]["ca_file"] = f'"{W}/bad.pem"'
    if name == "cert_without_key":
        cfg["uplink"]["cert_file"] = f'"{W}/bad.pem"'
    if name == "quarantine_on_file":
        cfg["buffer"]["quarantine_dir"] = f'"{W}/notadir/q"'
    if name == "no2_cal_garbage":
        cfg["sensors.no2"]["calibration_file"] = f'"{W}/cal.toml"'
    return render(cfg)


def run_case(name: str, cfg: dict) -> dict:
    d = W / name[:40]
    d.mkdir()
    p = d / "agent.toml"
    p.write_text(fill(name, cfg, d))
    chk = subprocess.run([EDGE, "config", "check", str(p)], capture_output=True, text=True, timeout=60)
    t0 = time.monotonic()
    run = subprocess.Popen([EDGE, "run", "--config", str(p)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        out, _ = run.communicate(timeout=RUN_S)
        rc = run.returncode
        ran = "exited"
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGTERM)
        try:
            out, _ = run.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            run.kill()
            out, _ = run.communicate()
        rc = run.returncode
        ran = "running"
    check_ok = chk.returncode == 0
    run_ok = ran == "running"
    tb = "Traceback" in out or "Traceback" in chk.stdout + chk.stderr
    agree = (check_ok == run_ok) and (check_ok or (chk.returncode == 2 and rc == 2)) and not tb
    last = [ln for ln in (chk.stdout + chk.stderr).splitlines() if ln.strip()][-1:] if not check_ok else ["OK"]
    runlast = [ln for ln in out.splitlines() if "ERROR" in ln or "rror" in ln or ln.startswith("  ")][:3]
    return {"case": name, "check_rc": chk.returncode, "run": ran, "run_rc": rc, "agree": agree, "traceback": tb,
            "check_says": last[0][:200] if last else "", "run_says": [x[:200] for x in runlast],
            "secs": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    import json
    flt = sys.argv[1] if len(sys.argv) > 1 else ""
    bad = 0
    for n, c in CASES.items():
        if flt and flt not in n:
            continue
        r = run_case(n, c)
        bad += not r["agree"]
        print(json.dumps(r), flush=True)
    print(f"DISAGREE {bad}", flush=True)
