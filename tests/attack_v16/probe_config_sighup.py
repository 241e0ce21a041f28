"""v16 probe: the same generated configs through a SIGHUP reload of one running agent.

Run: python tests/attack_v16/probe_config_sighup.py   (after probe_config_agree.py's cases)
Oracle (docs): check exit 0 <=> the reload applies ("reloaded"), check exit 2 <=> the reload is
refused by key and the agent keeps running. Sections a running agent cannot change (device, buffer,
simulation) are reported as "at the next start"; such a case agrees if the reload says so.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_config_agree as P  # noqa: E402

d = P.W / "_sighup"
d.mkdir()
cfgp = d / "agent.toml"
log = d / "run.log"
base = P.case()
cfgp.write_text(P.fill("base", base, d))
fh = log.open("w")
agent = subprocess.Popen([P.EDGE, "run", "--config", str(cfgp)], stdout=fh, stderr=subprocess.STDOUT)
deadline = time.monotonic() + 60
while "sampling: ready" not in log.read_text() and time.monotonic() < deadline:
    time.sleep(0.5)
bad = 0
only = sys.argv[1] if len(sys.argv) > 1 else ""
for name, cfg in P.CASES.items():
    if only and only not in name:
        continue
    cd = P.W / ("_h_" + name[:40])
    cd.mkdir()
    text = P.fill(name, {s: dict(kv) for s, kv in cfg.items()}, cd).replace(f"{cd}/data", f"{d}/data")
    cfgp.write_text(text)
    chk = subprocess.run([P.EDGE, "config", "check", str(cfgp)], capture_output=True, text=True)
    mark = log.stat().st_size
    agent.send_signal(signal.SIGHUP)
    verdict, lines = "none", []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        time.sleep(0.5)
        new = log.read_text(errors="replace")[mark:]
        lines = [ln for ln in new.splitlines() if "reload" in ln]
        if any("reloaded" in ln for ln in lines):
            verdict = "applied"
            break
        if any("keeping the running configuration" in ln for ln in lines):
            verdict = "refused"
            break
        if agent.poll() is not None:
            verdict = f"AGENT DIED rc={agent.returncode}"
            break
    later = "at the next start" in " ".join(lines)
    agree = (chk.returncode == 0 and verdict == "applied") or (chk.returncode == 2 and verdict == "refused") \
        or (chk.returncode == 2 and verdict == "applied" and later)
    bad += not agree
    print(json.dumps({"case": name, "check_rc": chk.returncode, "reload": verdict, "next_start": later,
                      "agree": agree, "said": [ln[24:200] for ln in lines[:2]]}), flush=True)
    if agent.poll() is not None:
        break
    cfgp.write_text(P.fill("base", P.case(), d))  # back to a good one between cases
    mark = log.stat().st_size
    agent.send_signal(signal.SIGHUP)
    time.sleep(2)
agent.send_signal(signal.SIGTERM)
try:
    rc = agent.wait(30)
except subprocess.TimeoutExpired:
    agent.kill()
    rc = "killed"
tb = "Traceback" in log.read_text(errors="replace")
print(f"DISAGREE {bad} agent_rc={rc} traceback_in_log={tb} log={log}")
