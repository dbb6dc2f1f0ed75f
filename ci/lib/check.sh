# shellcheck shell=bash
# Shared by ci/setup and the ci/check-* scripts (sourced): Debian package installs and a
# PASS/FAIL/SKIP tally.

have() { command -v "$1" >/dev/null 2>&1; }

# apt_install WHO PACKAGE...: installs the packages (as root; apt-get update only when the
# package lists are not enough), or prints why not (naming WHO, with apt's output) and returns 1
apt_install() {
  local who=$1 log
  shift
  (($# > 0)) || return 0
  if [[ $(id -u) != 0 ]]; then
    echo "$who: missing $*; run as root to install them" >&2
    return 1
  fi
  log=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1 &&
     ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "$who: could not install $*" >&2
    return 1
  fi
  rm -f "$log"
}

# apt_need WHO COMMAND:PACKAGE...: installs the package of every command that is missing
apt_need() {
  local who=$1 need=() t
  shift
  for t in "$@"; do have "${t%%:*}" || need+=("${t#*:}"); done
  apt_install "$who" "${need[@]}"
}

# cargo_tool CRATE VERSION: `cargo install --locked CRATE@VERSION` unless that version is
# installed (versions: ci/tools.env)
cargo_tool() {
  local crate=$1 version=$2
  cargo install --list 2>/dev/null | grep -qxF "$crate v$version:" && return 0
  cargo install --locked --quiet "$crate@$version"
}

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; }
# summary: the tally as the last line; non-zero when anything failed
summary() {
  echo "$passed passed, $failed failed"
  ((failed == 0))
}
