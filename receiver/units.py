"""The unit of each measured quantity as SQL, so both stores' ``observations`` views carry it.

Analysts query the view with their own tools (psql, QGIS, Datasette), not through our
exports: a value without its unit beside it is a number they would have to look up.
One mapping (``receiver.export.unit_of``: the map quantities' units, then the others),
spelled as a CASE expression that SQLite and PostgreSQL both read.
"""

from __future__ import annotations


def unit_sql(column: str) -> str:
    """``CASE <column> WHEN 'pm25' THEN 'µg/m³' ... END`` (NULL for a quantity of unknown unit)."""
    # Imported here: the stores build their views at start-up, and export imports the map code.
    from receiver.aggregate import QUANTITIES
    from receiver.export import OTHER_UNITS

    units = {**OTHER_UNITS, **{k: q.unit for k, q in QUANTITIES.items()}}
    whens = " ".join(f"WHEN {_lit(k)} THEN {_lit(u)}" for k, u in sorted(units.items()))
    return f"CASE {column} {whens} END"


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
