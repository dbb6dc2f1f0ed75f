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
# cargo_target KEY TARGET: linker or runner of TARGET in .cargo/config.toml (the one place the
# cross linkers and qemu-user runners are written down)
cargo_target() {
  python3 -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["target"][sys.argv[3]][sys.argv[2]])' \
    "$(dirname "${BASH_SOURCE[0]}")/../../.cargo/config.toml" "$1" "$2"
}

pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
skip() { echo "SKIP $1: $2"; }
# summary: the tally as the last line; non-zero when anything failed
summary() {
  echo "$passed passed, $failed failed"
  ((failed == 0))
}

# debian_mirror: the Debian archive URI of the host's apt configuration (deb822 or one-line
# sources; the security archive skipped), or $POWERMETER_DEBIAN_MIRROR when set
debian_mirror() {
  local m=${POWERMETER_DEBIAN_MIRROR:-}
  if [[ -z $m ]]; then
    m=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v security | head -n1 || true)
  fi
  if [[ -z $m ]]; then
    m=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]*\).*/\2/p' \
        /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1 || true)
  fi
  [[ -n $m ]] || return 1
  echo "$m"
}

# apt_backports WHO PACKAGE...: installs the packages from bookworm-backports (the host's
# mirror; the source is added once), e.g. qemu 10: bookworm's qemu 7.2 crashes TCG guests
# with -smp 2 and has no raspi4b machine
apt_backports() {
  local who=$1 mirror list=/etc/apt/sources.list.d/powermeter-backports.sources
  shift
  (($# > 0)) || return 0
  if [[ ! -e $list ]] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(debian_mirror) || { echo "$who: no Debian mirror in the apt configuration" >&2; return 1; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" >"$list"
    apt-get update -q >/dev/null 2>&1 || true
  fi
  apt_install "$who" -t bookworm-backports "$@"
}
