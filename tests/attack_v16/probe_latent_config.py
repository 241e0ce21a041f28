"""v16 probe: settings `edge config check` passes that stop the agent later (exit 1, traceback).

Run: python tests/attack_v16/probe_latent_config.py
1. buffer.quarantine_dir under a regular file: check OK, run OK, then the first corrupt buffer at
   start -> NotADirectoryError traceback, exit 1 (not 2, so RestartPreventExitStatus=2 does not stop a
   systemd restart loop; the van samples nothing while it loops).
2. uplink.tls with a ca_file / cert_file that exists but is not PEM: check OK, run -> ssl.SSLError
   traceback, exit 1.
Expected (docs/technician.md, issue 16.3): check and run agree, exit 2, the key named.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

EDGE = str(Path(__file__).resolve().parents[2] / ".venv/bin/edge")
W = Path(tempfile.mkdtemp(prefix="v16lat"))
(W / "notadir").write_text("x")
(W / "bad.pem").write_text("not a certificate\n")
COMMON = ('[uplink]\nhost = "127.0.0.1"\nport = 1\n{uplink}\n[sensors.pm]\ndriver = "sim-pm"\n'
          '[simulation]\nenabled = true\nspeedup = 1.0\n')


def cfg(name: str, extra: str, uplink: str = "") -> Path:
    p = W / f"{name}.toml"
    p.write_text(f'[device]\nid = "van-l"\ndata_dir = "{W}/{name}"\n{extra}\n' + COMMON.format(uplink=uplink))
    return p


def run(p: Path, secs: float = 15) -> tuple[int | str, str]:
    try:
        r = subprocess.run([EDGE, "run", "--config", str(p)], capture_output=True, text=True, timeout=secs)
        return r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        return "running", str(e.stdout or "")


def check(p: Path) -> int:
    return subprocess.run([EDGE, "config", "check", str(p)], capture_output=True).returncode


results = []
q = cfg("quarantine", f'[buffer]\nquarantine_dir = "{W}/notadir/q"')
c1 = check(q)
r1, out1 = run(q, 12)  # first start: a buffer is born (unless refused, as since f16)
db = W / "quarantine" / "buffer.sqlite"
if db.exists():
    b = bytearray(db.read_bytes())
    b[:16] = b"garbage garbage!"
    db.write_bytes(bytes(b))
    r2, out2 = run(q, 20)
else:
    r2, out2 = r1, out1
results.append(("quarantine_dir under a file", c1, r1, r2, "Traceback" in out2, out2.strip().splitlines()[-1:]))
for name, up in (("bad_ca", f'tls = true\nca_file = "{W}/bad.pem"'), ("bad_cert", f'tls = true\ncert_file = "{W}/bad.pem"\nkey_file = "{W}/bad.pem"')):
    p = cfg(name, "", up)
    c = check(p)
    r, out = run(p, 15)
    results.append((name, c, "-", r, "Traceback" in out, out.strip().splitlines()[-1:]))
bad = 0
for name, c, first, rc, tb, last in results:
    ok = (c == 2 and rc == 2) or (c == 0 and rc == "running" and not tb)
    bad += not ok
    print(f"{'ok' if ok else 'FAIL'} {name}: check={c} first_run={first} run={rc} traceback={tb} last={last}")
print(f"FAILED {bad} of {len(results)}")
