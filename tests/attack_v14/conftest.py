"""Task v14's attack probes (second tester): never collected by the normal suite (files are
probe_*.py; run with ATTACK_T14=1, like tests/attack_t14)."""

import os

collect_ignore_glob = ["probe_*.py"] if not os.environ.get("ATTACK_T14") else []
