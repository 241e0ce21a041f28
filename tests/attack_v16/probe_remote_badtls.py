"""v16 probe: a remote configuration request the schema passes but the uplink cannot build
(tls with a ca_file that exists but is not PEM), through a real Mosquitto and a real `edge run`.

Run: .venv/bin/python tests/attack_v16/probe_remote_badtls.py
Expected (issue 16.3, docs): refused by key, an ack with the request's id, the van keeps running.
A control request with a misspelt key shows the path answers at all.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from simulator.broker import LocalBroker

EDGE = str(Path(__file__).resolve().parents[2] / ".venv/bin/edge")
W = Path(tempfile.mkdtemp(prefix="v16rem"))
(W / "bad.pem").write_text("not a certificate\n")

with LocalBroker() as broker:
    cfg = W / "agent.toml"
    cfg.write_text(f'[device]\nid = "van-r"\ndata_dir = "{W}/data"\n[uplink]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                   '[sensors.pm]\ndriver = "sim-pm"\n[simulation]\nenabled = true\nspeedup = 1.0\n')
    log = (W / "run.log").open("w")
    agent = subprocess.Popen([EDGE, "run", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    acks: list[dict] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v16-probe")
    c.on_message = lambda cl, u, m: acks.append(json.loads(m.payload))
    c.connect("127.0.0.1", broker.port)
    c.subscribe("datalab/v1/van-r/config/ack", qos=1)
    c.loop_start()
    t0 = time.monotonic()
    while "connected" not in (W / "run.log").read_text() and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    time.sleep(2)
    reqs = [{"id": "v16-control", "config": {"uplink": {"prot": 1}}},
            {"id": "v16-badca", "config": {"uplink": {"tls": True, "ca_file": str(W / "bad.pem")}}}]
    for r in reqs:
        c.publish("datalab/v1/van-r/config", json.dumps(r), qos=1)
        t1 = time.monotonic()
        while not any(a.get("id") == r["id"] for a in acks) and time.monotonic() - t1 < 30:
            time.sleep(0.5)
        got = [a for a in acks if a.get("id") == r["id"]]
        print(r["id"], "->", json.dumps(got)[:300] if got else "NO ACK in 30 s", "| agent alive:", agent.poll() is None)
    agent.terminate()
    agent.wait(30)
    c.loop_stop()
    text = (W / "run.log").read_text()
    print("traceback in agent log:", "Traceback" in text)
    print("\n".join(ln[:220] for ln in text.splitlines() if "remote" in ln.lower() or "hook" in ln)[-1500:])
