"""A read-only analyst role on the PostgreSQL store (``datalab-receiver grant-reader``).

Why a command: the store lives in its own schema (``datalab``), so a fresh role first
meets "relation does not exist" (not on its search_path), then "permission denied"
(no USAGE, no SELECT), and tables made later (new partitions, the maps' tables on the
first build) would be closed to it again. One idempotent command sets all of it:

* the role (LOGIN, no password: the administrator sets one with psql's ``\\password``
  or uses peer/cert authentication, so no secret passes through our command line);
* CONNECT on the database, USAGE on the schema, SELECT on every table and view in it;
* default privileges, so tables the store's owner makes later are readable too;
* ``search_path = datalab, public`` (PostGIS' types live in public) and
  ``default_transaction_read_only``: a slip in psql cannot write even where a
  grant was forgotten.

Nothing here grants INSERT, UPDATE, DELETE or TRUNCATE.
"""

from __future__ import annotations

import re
from typing import Any

from psycopg import sql

from core.errors import ConfigError

# A plain identifier: analysts type it in psql and QGIS without quotes.
_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def grant_reader(conn: Any, role: str, schema: str = "datalab") -> list[str]:
    """Make ``role`` a read-only reader of ``schema`` (idempotent); the statements run."""
    if not _ROLE.fullmatch(role):
        raise ConfigError("role", f"{role!r} is not a plain role name (lower case letters, digits, _)")
    owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s",
                         (schema,)).fetchone()
    if owner is None:
        raise ConfigError("store", f"this database has no schema {schema!r}: is it a DataLab store?")
    # Making a role and setting its defaults (ALTER ROLE ... SET) is an administrator's right, which
    # the store's owner on a real server (install-central's `datalab`) rightly lacks: say so first,
    # rather than fail half-way with "permission denied".
    if not conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        raise ConfigError("store", "making an analyst role needs a PostgreSQL administrator (superuser or "
                          "CREATEROLE), not the store's own role; on the database server run it as postgres: "
                          "runuser -u postgres -- datalab-receiver grant-reader --store "
                          f"'postgresql:///{conn.info.dbname}?host=/var/run/postgresql' {role}")
    r, s = sql.Identifier(role), sql.Identifier(schema)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    db = conn.execute("SELECT current_database()").fetchone()[0]
    stmts = [] if exists else [sql.SQL("CREATE ROLE {} LOGIN").format(r)]
    stmts += [
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(db), r),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
        sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
        # Tables made later by the store's owner (partitions, the maps' tables): readable too.
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
            sql.SQL(owner[0]), s, r),
        sql.SQL("ALTER ROLE {} SET search_path = {}, public").format(r, s),
        sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(r),
    ]
    done = []
    with conn.transaction():
        for st in stmts:
            conn.execute(st)
            done.append(st.as_string(conn))
    return done
