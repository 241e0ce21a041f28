"""The van under a real systemd: a cached Debian bookworm rootfs booted with systemd-nspawn.

rootfs.py builds (once, cached outside the repo) the base userland; container.py copies it,
boots it with systemd as PID 1 and runs commands inside with nsenter. The tests are in
tests/test_platform_systemd.py (marker ``platform``); docs/install.md says how to run them.
"""
