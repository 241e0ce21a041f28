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


class RoleRefused(ConfigError):
    """The named role must not be made read-only: it runs the store or the cluster (exit 2)."""

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
    _refuse_role_in_charge(conn, role, owner[0])
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


def _refuse_role_in_charge(conn: Any, role: str, owner: str) -> None:
    """Refuse a role whose read-only default would break the centre (issue 17, findings 1 and 10).

    ``ALTER ROLE ... SET default_transaction_read_only`` on the store's owner stops the receiver
    writing; on a superuser it holds cluster-wide; ``public`` and ``pg_*`` are reserved names
    PostgreSQL will not alter (a traceback before). A role that owns anything in this database
    or may act as the owner is the store's, not an analyst's.
    """
    if role == "public" or role.startswith("pg_"):
        raise RoleRefused("role", f"{role!r} is a reserved PostgreSQL role; name a new analyst role")
    row = conn.execute(
        "SELECT r.rolsuper,"
        " r.rolname = %(owner)s OR pg_has_role(r.oid, %(owner)s, 'MEMBER'),"
        " EXISTS (SELECT 1 FROM pg_class WHERE relowner = r.oid)"
        " OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspowner = r.oid)"
        " OR EXISTS (SELECT 1 FROM pg_proc WHERE proowner = r.oid)"
        " OR EXISTS (SELECT 1 FROM pg_type WHERE typowner = r.oid)"
        " OR EXISTS (SELECT 1 FROM pg_database WHERE datname = current_database() AND datdba = r.oid)"
        " FROM pg_roles r WHERE r.rolname = %(role)s", {"role": role, "owner": owner}).fetchone()
    if row is None:
        return  # a new role: grant_reader makes it
    superuser, acts_as_owner, owns = row
    if superuser:
        raise RoleRefused("role", f"{role!r} is a superuser; an analyst role must be a plain one")
    if acts_as_owner or owns:
        raise RoleRefused("role", f"{role!r} owns objects of this store (or acts as its owner {owner!r}); "
                          "making it read-only would stop the receiver: name a separate analyst role")
