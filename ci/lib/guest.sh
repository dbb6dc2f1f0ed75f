# shellcheck shell=bash
# Guest helpers for the qemu appliance tests (sourced by ci/system-test and its scenarios).
#
# One "current guest" at a time: a private copy of build/qemu/disk.img with a test SSH key
# provisioned on its data partition (the factory image has no key, so no SSH), booted by qemu
# under -accel tcg with its serial console in a log file and these ports on 127.0.0.1:
#   GUEST_SSH_PORT -> 22, GUEST_LEGACY_PORT -> 9001, GUEST_HTTP_PORT -> 9002
#
#   guest_prepare [DISK]      copy build/qemu/disk.img to DISK (default $GUEST_DIR/disk.img),
#                             put the test key in /data/ssh/authorized_keys of the copy, and
#                             make the copy GUEST_GROW_MIB (256) bigger than the image
#   guest_provision_key DISK PUBKEY
#                             put PUBKEY into /data/ssh/authorized_keys of the image file DISK
#   guest_start [DISK]        boot DISK (default: the prepared copy) in the background
#   guest_wait_ssh [SECS]     wait until `ssh root@guest true` works (default 300 s)
#   guest_ssh CMD...          run CMD (one shell string) in the guest as root; stdin is passed on.
#                             Retries while the connection itself fails (exit 255), up to 60 s.
#   guest_ssh_once CMD...     one attempt, 10 s connect timeout (for guests that may be rebooting)
#   guest_boot_id             the guest's current boot id
#   guest_reboot [SECS]       clean reboot; waits for a new boot id over SSH (default 300 s)
#   guest_kill                pull the plug: SIGKILL to qemu (the disk copy stays)
#   guest_boot_again [SECS]   guest_start on the same disk + guest_wait_ssh (after guest_kill)
#   guest_stop                clean power-off (falls back to guest_kill after 60 s)
#   guest_serial              print the serial console log of the current guest
#   guest_wait_ready [SECS]   wait for SSH and powermeter.service active (READY=1 received)
#   guest_count               the counter from port 9001, as seen from the host
#   guest_ready_seconds       kernel start -> READY=1 of powermeter.service in this boot (s)
#   guest_qemu DISK VARS SERIAL [QEMU ARGS...]
#                             start a bare qemu of the appliance (no port forwards unless
#                             given), print its pid; for tests that need a second machine
#
# Settings (environment): POWERMETER_BUILD_DIR (default <repo>/build), GUEST_DIR (work dir,
# default build/qemu/test), GUEST_MEM (MiB, 1024), GUEST_SMP (1; bookworm's qemu 7.2 crashes
# TCG guests with 2), GUEST_ACCEL (tcg).

GUEST_REPO=${GUEST_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
GUEST_BUILD=${POWERMETER_BUILD_DIR:-$GUEST_REPO/build}/qemu
GUEST_DIR=${GUEST_DIR:-$GUEST_BUILD/test}
GUEST_MEM=${GUEST_MEM:-1024}
GUEST_SMP=${GUEST_SMP:-1}
GUEST_ACCEL=${GUEST_ACCEL:-tcg}
GUEST_KEY=${GUEST_KEY:-$GUEST_BUILD/testkey/id_ed25519}
GUEST_DISK=''
GUEST_VARS=''
GUEST_PID=''
GUEST_SERIAL=''
GUEST_SSH_PORT=''
GUEST_LEGACY_PORT=''
GUEST_HTTP_PORT=''
GUEST_OVMF_CODE=${GUEST_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}

guest_log() { echo "  [guest $(date -u +%H:%M:%S)] $*" >&2; }

# guest_layout: sets GUEST_DATA_OFFSET_MIB, GUEST_DATA_SIZE_MIB from images/qemu/layout.env
guest_layout() {
  # shellcheck source=images/qemu/layout.env
  . "$GUEST_REPO/images/qemu/layout.env"
  GUEST_DATA_OFFSET_MIB=$((1 + ESP_SIZE_MIB + 2 * SLOT_SIZE_MIB))
  GUEST_DATA_SIZE_MIB=$DATA_SIZE_MIB
}

guest_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# guest_provision_key DISK PUBKEY: write PUBKEY as /data/ssh/authorized_keys (root, 0600) into
# the data partition of the image file DISK (no mount needed: debugfs on a copy of the partition)
guest_provision_key() {
  local disk=$1 pub=$2 part
  guest_layout
  part=$(mktemp "${TMPDIR:-/tmp}/powermeter-data.XXXXXX")
  dd if="$disk" of="$part" bs=1M skip="$GUEST_DATA_OFFSET_MIB" count="$GUEST_DATA_SIZE_MIB" status=none
  debugfs -w -f - "$part" >/dev/null 2>&1 <<EOF
mkdir ssh
rm ssh/authorized_keys
write $pub ssh/authorized_keys
set_inode_field ssh mode 040700
set_inode_field ssh uid 0
set_inode_field ssh gid 0
set_inode_field ssh/authorized_keys mode 0100600
set_inode_field ssh/authorized_keys uid 0
set_inode_field ssh/authorized_keys gid 0
EOF
  if ! debugfs -R 'cat ssh/authorized_keys' "$part" 2>/dev/null | cmp -s - "$pub"; then
    rm -f "$part"; echo "could not write the key into the data partition of $disk" >&2; return 1
  fi
  dd if="$part" of="$disk" bs=1M seek="$GUEST_DATA_OFFSET_MIB" conv=notrunc,sparse status=none
  rm -f "$part"
}

guest_prepare() {
  local disk=${1:-$GUEST_DIR/disk.img}
  mkdir -p "$GUEST_DIR" "$(dirname "$GUEST_KEY")"
  [ -s "$GUEST_KEY" ] || ssh-keygen -q -t ed25519 -N '' -C powermeter-test -f "$GUEST_KEY"
  cp --sparse=always "$GUEST_BUILD/disk.img" "$disk"
  guest_provision_key "$disk" "$GUEST_KEY.pub" || return 1
  # a bigger "card" than the image: the data partition grows to it at first boot
  truncate -s "+${GUEST_GROW_MIB:-256}M" "$disk"
  GUEST_DISK=$disk
  GUEST_VARS=${disk%.img}.vars.fd
  cp "$GUEST_BUILD/OVMF_VARS.fd" "$GUEST_VARS"
}

# guest_qemu DISK VARS SERIAL [ARGS...]: start qemu in the background, print its pid
guest_qemu() {
  local disk=$1 vars=$2 serial=$3
  shift 3
  qemu-system-x86_64 -nodefaults -machine q35 -accel "$GUEST_ACCEL" -smp "$GUEST_SMP" -m "$GUEST_MEM" \
    -drive if=pflash,format=raw,unit=0,readonly=on,file="$GUEST_OVMF_CODE" \
    -drive if=pflash,format=raw,unit=1,file="$vars" \
    -drive if=none,id=disk0,format=raw,file="$disk" \
    -device virtio-blk-pci,drive=disk0,bootindex=0 \
    -device i6300esb -rtc base=utc \
    -display none -monitor none -serial "file:$serial" \
    "$@" </dev/null >"$serial.qemu" 2>&1 &
  echo $!
}

guest_start() {
  local disk=${1:-$GUEST_DISK}
  [ -n "$disk" ] || { echo "guest_start: no disk (guest_prepare first)" >&2; return 1; }
  if [ "$disk" != "$GUEST_DISK" ]; then
    GUEST_DISK=$disk; GUEST_VARS=${disk%.img}.vars.fd
    [ -s "$GUEST_VARS" ] || cp "$GUEST_BUILD/OVMF_VARS.fd" "$GUEST_VARS"
  fi
  [ -n "$GUEST_SSH_PORT" ] || GUEST_SSH_PORT=$(guest_free_port)
  [ -n "$GUEST_LEGACY_PORT" ] || GUEST_LEGACY_PORT=$(guest_free_port)
  [ -n "$GUEST_HTTP_PORT" ] || GUEST_HTTP_PORT=$(guest_free_port)
  # serial logs of successive boots of one disk: serial.log, serial.1.log, ...
  local n=0
  GUEST_SERIAL=${disk%.img}.serial.log
  while [ -e "$GUEST_SERIAL" ]; do n=$((n + 1)); GUEST_SERIAL=${disk%.img}.serial.$n.log; done
  GUEST_PID=$(guest_qemu "$disk" "$GUEST_VARS" "$GUEST_SERIAL" \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$GUEST_SSH_PORT-:22,hostfwd=tcp:127.0.0.1:$GUEST_LEGACY_PORT-:9001,hostfwd=tcp:127.0.0.1:$GUEST_HTTP_PORT-:9002" \
    -device virtio-net-pci,netdev=net0,romfile=)
  guest_log "qemu $GUEST_PID booting $(basename "$disk") (ssh :$GUEST_SSH_PORT, 9001 -> :$GUEST_LEGACY_PORT, 9002 -> :$GUEST_HTTP_PORT, serial $GUEST_SERIAL)"
}

guest_alive() { [ -n "$GUEST_PID" ] && kill -0 "$GUEST_PID" 2>/dev/null; }

guest_ssh_args() {
  echo -i "$GUEST_KEY" -p "$GUEST_SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o BatchMode=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=3
}

guest_ssh_once() {
  # shellcheck disable=SC2046
  ssh $(guest_ssh_args) -o ConnectTimeout=10 root@127.0.0.1 "$@"
}

guest_ssh() {
  local rc deadline=$((SECONDS + 60)) input=''
  # stdin is passed on (buffered, for the retries) unless it is a terminal or /dev/null
  if [ ! -t 0 ] && ! [ /dev/stdin -ef /dev/null ]; then
    input=$(mktemp "$GUEST_DIR/stdin.XXXXXX"); cat > "$input"
  fi
  while :; do
    rc=0
    # shellcheck disable=SC2046
    if [ -n "$input" ]; then
      ssh $(guest_ssh_args) -o ConnectTimeout=10 root@127.0.0.1 "$@" < "$input" || rc=$?
    else
      ssh $(guest_ssh_args) -o ConnectTimeout=10 root@127.0.0.1 "$@" < /dev/null || rc=$?
    fi
    if [ "$rc" != 255 ] || [ "$SECONDS" -ge "$deadline" ] || ! guest_alive; then break; fi
    sleep 2
  done
  [ -z "$input" ] || rm -f "$input"
  return "$rc"
}

guest_wait_ssh() {
  local deadline=$((SECONDS + ${1:-300}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    guest_alive || { echo "qemu exited: $(tail -n3 "$GUEST_SERIAL.qemu" 2>/dev/null | tr '\n' ' ')" >&2; return 1; }
    guest_ssh_once true </dev/null >/dev/null 2>&1 && return 0
    sleep 2
  done
  echo "no SSH within ${1:-300} s (serial: $(tail -n2 "$GUEST_SERIAL" | tr -d '\r' | tr '\n' ' '))" >&2
  return 1
}

guest_wait_ready() {
  local deadline=$((SECONDS + ${1:-300})) s=''
  guest_wait_ssh "${1:-300}" || return 1
  while [ "$SECONDS" -lt "$deadline" ]; do
    s=$(guest_ssh_once systemctl is-active powermeter.service </dev/null 2>/dev/null || true)
    [ "$s" = active ] && return 0
    sleep 2
  done
  echo "powermeter.service not active (state: ${s:-?})" >&2
  return 1
}

guest_boot_id() { guest_ssh cat /proc/sys/kernel/random/boot_id </dev/null; }

guest_reboot() {
  local old new deadline=$((SECONDS + ${1:-300}))
  old=$(guest_boot_id) || return 1
  guest_ssh_once 'systemctl reboot' </dev/null >/dev/null 2>&1 || true
  while [ "$SECONDS" -lt "$deadline" ]; do
    guest_alive || { echo "qemu exited during the reboot" >&2; return 1; }
    new=$(guest_ssh_once cat /proc/sys/kernel/random/boot_id </dev/null 2>/dev/null || true)
    if [ -n "$new" ] && [ "$new" != "$old" ]; then return 0; fi
    sleep 3
  done
  echo "guest did not come back within ${1:-300} s" >&2
  return 1
}

guest_kill() {
  if guest_alive; then
    kill -KILL "$GUEST_PID" 2>/dev/null || true
    wait "$GUEST_PID" 2>/dev/null || true
  fi
  GUEST_PID=''
}

guest_boot_again() {
  guest_kill
  guest_start "$GUEST_DISK" && guest_wait_ssh "${1:-300}"
}

guest_stop() {
  guest_alive || { GUEST_PID=''; return 0; }
  guest_ssh_once 'systemctl poweroff' </dev/null >/dev/null 2>&1 || true
  local i
  for i in $(seq 60); do guest_alive || break; sleep 1; done
  [ "${i:-0}" -lt 60 ] || guest_log "no clean power-off, killing qemu"
  guest_kill
}

guest_serial() { tr -d '\r' < "$GUEST_SERIAL"; }

guest_count() {
  python3 - "$GUEST_LEGACY_PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print(data.decode())
PY
}

# seconds from kernel start (CLOCK_MONOTONIC 0) to READY=1 of powermeter.service in this boot
guest_ready_seconds() {
  local us
  us=$(guest_ssh systemctl show -P ActiveEnterTimestampMonotonic powermeter.service </dev/null) || return 1
  [ "${us:-0}" -gt 0 ] || return 1
  awk -v u="$us" 'BEGIN { printf "%.1f\n", u / 1000000 }'
}
