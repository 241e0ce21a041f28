"""Probe v13 hook: record every batch the REAL van code encodes (all paths: seal, salvage, carriers).

Active only when V13_BATCH_LOG is set. Installed via PYTHONPATH so subprocesses (kill -9, power-cut
children) are recorded too. Patches core.wire.encode_batch as soon as core.wire is imported, before
buffer modules bind it by name.
"""
import base64
import importlib.abc
import importlib.machinery
import json
import os
import sys

_LOG = os.environ.get("V13_BATCH_LOG")


def _wrap(mod):
    orig = mod.encode_batch

    def encode_batch(batch, *a, **kw):
        payload = orig(batch, *a, **kw)
        try:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            # only what the van's buffer encodes (seal, salvage, carriers); not buffer.commit's
            # encodability trial (device "d", never sent), not batches test code builds itself
            if caller.startswith("buffer.") and batch.device != "d":
                with open(_LOG, "a") as f:
                    f.write(json.dumps({"pid": os.getpid(), "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                                        "argv": " ".join(sys.argv[:3])[:200], "caller": caller,
                                        "p": base64.b64encode(payload).decode()}) + "\n")
        except Exception:
            pass
        return payload

    mod.encode_batch = encode_batch


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "core.wire":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            _wrap(module)
        spec.loader.exec_module = exec_module
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
