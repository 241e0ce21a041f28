"""Measurements of datalab-edge, each against a baseline measured in the same run.

``python -m bench`` runs them all and prints one table (see bench/__main__.py).
"""

from __future__ import annotations


def print_table(rows: list[dict]) -> None:
    """Print benchmark rows: name, value unit, baseline, target, ok, note."""
    cols = ["name", "value", "baseline", "target", "ok", "note"]
    table = []
    for r in rows:
        value = r.get("value")
        value_s = f"{value:,}" if isinstance(value, (int, float)) else str(value)
        unit = r.get("unit", "")
        base = r.get("baseline")
        base_s = "" if base is None else (f"{base:,}" if isinstance(base, (int, float)) else str(base))
        if r.get("baseline_name"):
            base_s = f"{base_s} ({r['baseline_name']})"
        ok = r.get("ok")
        table.append([
            str(r.get("name", "")), f"{value_s} {unit}".strip(), base_s, str(r.get("target") or ""),
            "" if ok is None else ("yes" if ok else "NO"), str(r.get("note", "")),
        ])
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
