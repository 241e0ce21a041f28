# Shared by scripts/install-pi and scripts/install-central (sourced, not run): messages, the
# rollback record, atomic file placement, and the program's venv built beside the running one.
#
# The caller sets, before sourcing:  TOOL (its name, for messages and staging suffixes),
# ROOT (fake root or ""), DRY (1: print only), SYSTEM (1: run system commands), PY, SRC, OPT.
# All or nothing: every system change is recorded with undo_later; on an error the trap undoes
# the recorded ones last-first; COMMITTED=1 at the end says there is nothing to undo any more.

say() { printf '[%s] %s\n' "$TOOL" "$*"; }
note() { printf '[%s] note: %s\n' "$TOOL" "$*"; }
die() { printf '%s: %s\n' "$TOOL" "$*" >&2; exit 1; }
# Run a command, or only show it with --dry-run.
do_() { if [ "$DRY" = 1 ]; then printf '[%s] would run: %s\n' "$TOOL" "$*"; else "$@"; fi; }

# -- rollback: every system change is recorded, and undone on an error ------------------------

UNDO=()          # commands, undone last-first
COMMITTED=0
NEW_VENV=""      # the venv built by this run, removed unless it went live
undo_later() { UNDO+=("$*"); }
rollback() {
  local rc=$?
  [ $COMMITTED = 1 ] && return
  if [ $rc != 0 ] && [ "$DRY" = 0 ]; then
    say "failed (exit $rc): rolling back"
    local i
    for (( i=${#UNDO[@]}-1; i>=0; i-- )); do
      eval "${UNDO[$i]}" || say "rollback step failed: ${UNDO[$i]}"
    done
  fi
  # A venv that never went live is always removed (also on Ctrl-C).
  if [ -n "$NEW_VENV" ] && [ "$(readlink "$OPT/venv" 2>/dev/null)" != "venvs/${NEW_VENV##*/}" ]; then
    rm -rf "$NEW_VENV"
  fi
}
trap rollback EXIT
trap 'exit 130' INT TERM

# mkdir -p that records the first folder it made (the rollback removes it and what is under it).
mkdir_() {
  local d=$1 first=""
  local p=$d
  while [ ! -e "$p" ]; do first=$p; p=$(dirname "$p"); done
  [ -z "$first" ] && return 0
  do_ mkdir -p "$d"
  undo_later "rm -rf '$first'"
}

# Put a file in place atomically (write beside, rename); remembers how to undo it.
place() {  # place SOURCE DEST MODE
  local src=$1 dest=$2 mode=$3
  if [ "$DRY" = 1 ]; then do_ install -m "$mode" "$src" "$dest"; return; fi
  if [ -e "$dest" ] && cmp -s "$src" "$dest"; then chmod "$mode" "$dest"; return; fi
  if [ -e "$dest" ]; then
    cp -p "$dest" "$dest.$TOOL-old"
    undo_later "mv -f '$dest.$TOOL-old' '$dest'"
  else
    undo_later "rm -f '$dest'"
  fi
  install -m "$mode" "$src" "$dest.$TOOL-new"
  mv -f "$dest.$TOOL-new" "$dest"
}

own() {  # own USER:GROUP MODE PATH
  do_ chmod "$2" "$3"
  if [ "$SYSTEM" = 1 ]; then do_ chown "$1" "$3"; fi
}

# -- the program: a new venv beside the running one (not editable: the tree may go) ------------

# Named by what goes in (sources, extras, Python), so a re-run with nothing new builds nothing.
venv_prepare() {  # venv_prepare EXTRAS: sets VENV_ID, VENV, OLD_LINK; removes unfinished builds
  local extras=$1
  VENV_ID=$( (cd "$SRC" && find pyproject.toml edge drivers buffer uplink receiver simulator -type f \
       ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
     echo "$extras $("$PY" -c 'import sys; print(sys.version)')") | sha256sum | cut -c1-12)
  VENV=$OPT/venvs/$VENV_ID
  OLD_LINK=$(readlink "$OPT/venv" 2>/dev/null || true)
  if [ -d "$OPT/venvs" ] && [ "$DRY" = 0 ]; then
    # What an interrupted run left: builds that never went live.
    local v
    for v in "$OPT"/venvs/*; do
      [ -e "$v" ] || continue
      if [ "venvs/${v##*/}" != "$OLD_LINK" ] && [ ! -e "$v/.datalab-complete" ]; then
        say "removing an unfinished build of an earlier run: $v"
        rm -rf "$v"
      fi
    done
  fi
}

venv_build() {  # venv_build EXTRAS
  local extras=$1
  if [ "$SYSTEM" = 0 ]; then
    note "fake root: virtual environment $OPT/venv not created (pip skipped)"
  elif [ -e "$VENV/.datalab-complete" ]; then
    say "program up to date ($VENV, extras $extras)"
  else
    mkdir_ "$OPT/venvs"
    NEW_VENV=$VENV
    say "building $VENV with .[$extras]"
    do_ "$PY" -m venv "$VENV"
    do_ "$VENV/bin/python" -m pip install --quiet "$SRC[$extras]"
    do_ touch "$VENV/.datalab-complete"
  fi
}

# The venv link flips in one rename (a rollback flips it back).
venv_go_live() {
  [ "$SYSTEM" = 1 ] && [ "$OLD_LINK" != "venvs/$VENV_ID" ] || return 0
  if [ "$DRY" = 1 ]; then
    do_ ln -sfn "venvs/$VENV_ID" "$OPT/venv"
    return 0
  fi
  if [ -d "$OPT/venv" ] && [ ! -L "$OPT/venv" ]; then
    # A venv made by an older install: set aside, back on a rollback.
    mv "$OPT/venv" "$OPT/venv.$TOOL-old"
    undo_later "rm -f '$OPT/venv'; mv '$OPT/venv.$TOOL-old' '$OPT/venv'"
  elif [ -n "$OLD_LINK" ]; then
    undo_later "ln -sfn '$OLD_LINK' '$OPT/venv.$TOOL-new' && mv -T '$OPT/venv.$TOOL-new' '$OPT/venv'"
  else
    undo_later "rm -f '$OPT/venv'"
  fi
  ln -sfn "venvs/$VENV_ID" "$OPT/venv.$TOOL-new"
  mv -T "$OPT/venv.$TOOL-new" "$OPT/venv"
}

# After COMMITTED=1: the set-aside venv and the builds the live link no longer names.
venv_tidy() {
  [ "$DRY" = 0 ] || return 0
  rm -rf "$OPT/venv.$TOOL-old"
  if [ -d "$OPT/venvs" ] && [ "$SYSTEM" = 1 ]; then
    local v
    for v in "$OPT"/venvs/*; do
      [ "${v##*/}" = "$VENV_ID" ] || rm -rf "$v"
    done
  fi
}

# Enable a unit unless it is; a rollback disables it again.
enable_unit() {  # enable_unit NAME (SYSTEMCTL must be set)
  if ! "${SYSTEMCTL[@]}" is-enabled --quiet "$1" 2>/dev/null; then
    do_ "${SYSTEMCTL[@]}" enable "$1"
    undo_later "${SYSTEMCTL[*]} disable $1"
  fi
}
