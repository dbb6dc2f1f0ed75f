# shellcheck shell=bash
# shellcheck disable=SC2016,SC2015
# Base scenarios of ci/system-test (sourced by it after ci/lib/guest.sh): the daemon, its unit,
# the read-only verity root, the watchdog, the journal and the data partition, each checked in
# or against the booted qemu guest. A scenario returns non-zero with the reason as the last line
# on stderr.

base_fail() { echo "$*" >&2; return 1; }
base_log() { echo "  [base $(date -u +%H:%M:%S)] $*" >&2; }
BASE_TAMPER_PID=''
base_cleanup() { [ -z "$BASE_TAMPER_PID" ] || kill -KILL "$BASE_TAMPER_PID" 2>/dev/null || true; }

# the value of a Prometheus sample from the guest's /metrics (through the forwarded HTTP port)
base_metric() {
  curl -fsS --max-time 10 "http://127.0.0.1:$GUEST_HTTP_PORT/metrics" | awk -v m="$1" '$1 == m { print $2; exit }'
}

scenario_boot-ready() {
  local st main type count code status
  st=$(guest_ssh systemctl is-active powermeter.service) || true
  [ "$st" = active ] || { base_fail "powermeter.service is '$st'"; return 1; }
  type=$(guest_ssh systemctl show -P Type powermeter.service)
  [ "$type" = notify ] || { base_fail "powermeter.service is Type=$type, not notify"; return 1; }
  # READY=1 was received: a notify service only becomes active with it; STATUS= is the daemon's
  status=$(guest_ssh systemctl show -P StatusText powermeter.service)
  [ -n "$status" ] || { base_fail "no STATUS= from the daemon"; return 1; }
  main=$(guest_ssh systemctl show -P MainPID powermeter.service)
  [ "${main:-0}" -gt 0 ] || { base_fail "no main PID"; return 1; }
  guest_ssh "journalctl -b -o cat -u powermeter.service | grep -q 'Started powermeter.service'" ||
    { base_fail "systemd never logged the service as started (READY=1)"; return 1; }
  count=$(guest_count) || { base_fail "port 9001 does not answer from the host"; return 1; }
  [[ $count =~ ^[0-9]+$ ]] || { base_fail "port 9001 answered '$count', not a decimal count"; return 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$GUEST_HTTP_PORT/health" || true)
  [ "$code" = 200 ] || { base_fail "GET /health from the host: HTTP $code"; return 1; }
  BASE_MACHINE_ID=$(guest_ssh cat /etc/machine-id)
  base_log "active (pid $main, status '$status'), port 9001 says $count, /health 200; READY=1 $(guest_ready_seconds) s after kernel start"
}

scenario_readonly-root() {
  local src fstype opts w dmuuid hash cmdhash envhash
  read -r src fstype opts < <(guest_ssh findmnt -no SOURCE,FSTYPE,OPTIONS /)
  [ "$src" = /dev/mapper/root ] || { base_fail "/ is $src, not /dev/mapper/root"; return 1; }
  [ "$fstype" = squashfs ] || { base_fail "/ is $fstype, not squashfs"; return 1; }
  [[ ,$opts, == *,ro,* ]] || { base_fail "/ is mounted '$opts'"; return 1; }
  dmuuid=$(guest_ssh 'cat /sys/block/$(basename $(readlink -f /dev/mapper/root))/dm/uuid')
  [[ $dmuuid == CRYPT-VERITY-* ]] || { base_fail "/dev/mapper/root is not a dm-verity device (uuid '$dmuuid')"; return 1; }
  guest_ssh 'veritysetup status root' | grep -q 'status:.*verified' ||
    { base_fail "veritysetup status root: not verified"; return 1; }
  hash=$(guest_ssh "veritysetup status root | sed -n 's/^ *root hash: *//p'")
  cmdhash=$(guest_ssh "sed -n 's/.*roothash=\\([0-9a-f]*\\).*/\\1/p' /proc/cmdline")
  envhash=$(guest_ssh "grub-editenv /boot/efi/EFI/BOOT/grubenv list | sed -n 's/^A_ROOTHASH=//p'")
  [ -n "$hash" ] && [ "$hash" = "$cmdhash" ] && [ "$hash" = "$envhash" ] ||
    { base_fail "root hash of the device ($hash), the command line ($cmdhash) and grubenv A_ROOTHASH ($envhash) differ"; return 1; }
  [ "$hash" = "$(cat "$GUEST_BUILD/rootfs.roothash")" ] ||
    { base_fail "the root hash is not the one the build made"; return 1; }
  # writes anywhere on the root fail, also for root
  for w in / /etc /usr/bin /var/lib/dpkg/../.. /boot; do
    if guest_ssh "touch $w/.powermeter-write-test" 2>/dev/null; then
      base_fail "a write to $w succeeded"; return 1
    fi
  done
  guest_ssh 'mount -o remount,rw / 2>/dev/null && touch /.rw-test 2>/dev/null' &&
    { base_fail "remounting / read-write worked"; return 1; }
  [ "$(guest_ssh blockdev --getro /dev/mapper/root)" = 1 ] || { base_fail "the verity device is writable"; return 1; }
  # the writable places are elsewhere: /var and /data on the data partition, /tmp in RAM
  [ "$(guest_ssh findmnt -no FSTYPE /tmp)" = tmpfs ] || { base_fail "/tmp is not a tmpfs"; return 1; }
  guest_ssh 'findmnt -no SOURCE /data | grep -q "$(readlink -f /dev/disk/by-partlabel/data)"' ||
    { base_fail "/data is not the data partition"; return 1; }
  guest_ssh 'findmnt -no SOURCE /var | grep -q "\[/var\]"' || { base_fail "/var is not bound from /data/var"; return 1; }
  guest_ssh 'touch /var/.w /tmp/.w /data/.w && rm /var/.w /tmp/.w /data/.w' ||
    { base_fail "/var, /tmp or /data not writable"; return 1; }
  base_log "/ = $src ($fstype, ro), dm-verity root hash $hash = cmdline = grubenv; writes fail with EROFS"
}

# Flip a byte of slot A in a copy of the disk: a block the kernel reads when it mounts the root
# (the squashfs uid/gid table, which GRUB does not read, so the kernel still loads). dm-verity
# must refuse it: the boot fails (restart-on-corruption) and powermeter never starts.
scenario_verity-tamper() {
  local disk=$GUEST_DIR/tamper.img vars=$GUEST_DIR/tamper.vars.fd serial=$GUEST_DIR/tamper.serial.log
  local slot_off idx blk off deadline boots ok=0
  guest_layout
  slot_off=$(( (1 + ESP_SIZE_MIB) * 1048576 ))
  idx=$(od -An -t u8 -j 48 -N 8 "$GUEST_BUILD/rootfs.img" | tr -d ' ')
  blk=$(od -An -t u8 -j "$idx" -N 8 "$GUEST_BUILD/rootfs.img" | tr -d ' ')
  [ -n "$blk" ] && [ "$blk" -gt 0 ] || { base_fail "cannot read the squashfs id table"; return 1; }
  off=$((blk + 2))
  cp --sparse=always "$GUEST_BUILD/disk.img" "$disk"
  cp "$GUEST_BUILD/OVMF_VARS.fd" "$vars"
  python3 - "$disk" $((slot_off + off)) <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0xff]))
PY
  # the image still differs from its verity tree only in that byte: the check on the host agrees
  if veritysetup verify "$GUEST_BUILD/rootfs.img" "$GUEST_BUILD/rootfs.img" "$(cat "$GUEST_BUILD/rootfs.roothash")" \
       --hash-offset="$VERITY_HASH_OFFSET" >/dev/null 2>&1; then :; else
    base_fail "the untouched slot image does not verify"; return 1
  fi
  rm -f "$serial"
  BASE_TAMPER_PID=$(guest_qemu "$disk" "$vars" "$serial" -nic none)
  base_log "booting a copy with byte $off of slot A flipped (qemu $BASE_TAMPER_PID)"
  deadline=$((SECONDS + 420))
  while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$BASE_TAMPER_PID" 2>/dev/null; do
    boots=$(grep -c 'powermeter: booting slot' "$serial" 2>/dev/null || true)
    if grep -q 'verity.*corrupted' "$serial" 2>/dev/null && [ "${boots:-0}" -ge 2 ]; then ok=1; break; fi
    sleep 5
  done
  kill -KILL "$BASE_TAMPER_PID" 2>/dev/null || true
  wait "$BASE_TAMPER_PID" 2>/dev/null || true
  BASE_TAMPER_PID=''
  if grep -q 'Started.*powermeter.service\|Reached target.*Multi-User' "$serial"; then
    base_fail "the tampered slot booted to powermeter (see $serial)"; return 1
  fi
  [ "$ok" = 1 ] || { base_fail "no dm-verity corruption report followed by a restart (see $serial)"; return 1; }
  base_log "$(grep -m1 -o 'device-mapper: verity.*corrupted' "$serial"); the machine restarted ($boots boots seen), powermeter never started"
  rm -f "$disk" "$vars"
}

scenario_hardening() {
  local out exp main uid status
  out=$(guest_ssh 'systemd-analyze security --no-pager powermeter.service' 2>&1) ||
    { base_fail "systemd-analyze security failed: $(tail -n1 <<<"$out")"; return 1; }
  exp=$(sed -n 's/.*Overall exposure level for powermeter.service: *\([0-9.]*\).*/\1/p' <<<"$out")
  [ -n "$exp" ] || { base_fail "no exposure level in: $(tail -n1 <<<"$out")"; return 1; }
  awk -v e="$exp" 'BEGIN { exit !(e <= 1.0) }' || { base_fail "exposure $exp > 1.0"; return 1; }
  main=$(guest_ssh systemctl show -P MainPID powermeter.service)
  [ "${main:-0}" -gt 0 ] || { base_fail "powermeter.service not running"; return 1; }
  status=$(guest_ssh cat "/proc/$main/status")
  uid=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' <<<"$status")
  for u in $uid; do [ "$u" != 0 ] || { base_fail "powermeterd runs with uid 0 ($uid)"; return 1; }; done
  awk '/^Gid:/ { for (i = 2; i <= 5; i++) if ($i == 0) exit 1 }' <<<"$status" ||
    { base_fail "powermeterd runs with gid 0"; return 1; }
  for c in CapInh CapPrm CapEff CapBnd CapAmb; do
    v=$(awk -v c="$c:" '$1 == c { print $2 }' <<<"$status")
    [ "$v" = 0000000000000000 ] || { base_fail "powermeterd has $c=$v"; return 1; }
  done
  grep -q '^NoNewPrivs:[[:space:]]*1' <<<"$status" || { base_fail "NoNewPrivs is not set"; return 1; }
  grep -q '^Seccomp:[[:space:]]*2' <<<"$status" || { base_fail "no seccomp filter"; return 1; }
  base_log "exposure $exp; uid $uid; no capabilities; NoNewPrivs, seccomp filter"
}

scenario_watchdog-restart() {
  local pid1 pid2 n1 n2 c0 s0 s c2 deadline
  pid1=$(guest_ssh systemctl show -P MainPID powermeter.service)
  n1=$(guest_ssh systemctl show -P NRestarts powermeter.service)
  [ "${pid1:-0}" -gt 0 ] || { base_fail "powermeter.service not running"; return 1; }
  # a counter value that is surely persisted: wait for a state save after reading it
  c0=$(guest_count) || { base_fail "port 9001 does not answer"; return 1; }
  s0=$(base_metric powermeter_state_saves_total)
  deadline=$((SECONDS + 90))
  while s=$(base_metric powermeter_state_saves_total) && [ "$s" = "$s0" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 2; done
  [ "$s" != "$s0" ] || { base_fail "no state save within 90 s (powermeter_state_saves_total $s0)"; return 1; }
  guest_ssh "kill -STOP $pid1"
  base_log "SIGSTOP to powermeterd $pid1 (count $c0 saved); waiting for the watchdog"
  deadline=$((SECONDS + 120))
  while [ "$SECONDS" -lt "$deadline" ]; do
    pid2=$(guest_ssh systemctl show -P MainPID powermeter.service)
    if [ "${pid2:-0}" -gt 0 ] && [ "$pid2" != "$pid1" ] &&
       [ "$(guest_ssh systemctl is-active powermeter.service)" = active ]; then break; fi
    sleep 3
  done
  [ "${pid2:-0}" -gt 0 ] && [ "$pid2" != "$pid1" ] || { base_fail "not restarted within 120 s (pid $pid2)"; return 1; }
  n2=$(guest_ssh systemctl show -P NRestarts powermeter.service)
  [ "$n2" -gt "$n1" ] || { base_fail "NRestarts $n1 -> $n2"; return 1; }
  guest_ssh "journalctl -b -u powermeter.service -o cat | grep -q 'Watchdog timeout'" ||
    { base_fail "no 'Watchdog timeout' of powermeter.service in the journal: killed by something else"; return 1; }
  c2=$(guest_count) || { base_fail "port 9001 does not answer after the restart"; return 1; }
  [ "$c2" -ge "$c0" ] || { base_fail "count went back from $c0 to $c2 over the restart"; return 1; }
  base_log "watchdog timeout; restarted as $pid2 (NRestarts $n1 -> $n2); count $c0 -> $c2"
}

scenario_persist-reboot() {
  local c1 c2 mid t
  c1=$(guest_count) || { base_fail "port 9001 does not answer"; return 1; }
  guest_reboot 600 || return 1
  guest_wait_ready 300 || return 1
  t=$(guest_ready_seconds || echo '?')
  c2=$(guest_count) || { base_fail "port 9001 does not answer after the reboot"; return 1; }
  [ "$c2" -ge "$c1" ] || { base_fail "count before the reboot $c1 > after $c2"; return 1; }
  mid=$(guest_ssh cat /etc/machine-id)
  if [ -n "${BASE_MACHINE_ID:-}" ] && [ "$mid" != "$BASE_MACHINE_ID" ]; then
    base_fail "machine-id changed over the reboot ($BASE_MACHINE_ID -> $mid)"; return 1
  fi
  base_log "count $c1 -> $c2 over a clean reboot; machine-id $mid kept; READY=1 $t s after kernel start"
}

scenario_journald() {
  local boots j fields
  boots=$(guest_ssh 'journalctl --list-boots --no-pager | grep -c .')
  if [ "${boots:-0}" -lt 2 ]; then
    guest_reboot 600 || return 1
    guest_wait_ready 300 || return 1
  fi
  guest_ssh 'test -d /var/log/journal/$(cat /etc/machine-id)' ||
    { base_fail "no persistent journal directory /var/log/journal/<machine-id>"; return 1; }
  guest_ssh 'findmnt -no SOURCE -T /var/log/journal | grep -q "$(readlink -f /dev/disk/by-partlabel/data)"' ||
    { base_fail "the journal is not on the data partition"; return 1; }
  # entries of the daemon itself (not only systemd's about it) from the previous boot
  j=$(guest_ssh 'journalctl -b -1 -o json --no-pager SYSLOG_IDENTIFIER=powermeterd _SYSTEMD_UNIT=powermeter.service' ) ||
    { base_fail "journalctl -b -1 failed"; return 1; }
  [ -n "$j" ] || { base_fail "no powermeterd entries from the previous boot in the journal"; return 1; }
  fields=$(python3 -c '
import json, sys
keys = set()
for line in sys.stdin:
    keys.update(json.loads(line).keys())
print(" ".join(sorted(k for k in keys if k in ("CODE_FILE", "CODE_LINE", "TARGET", "PRIORITY") or k.startswith("F_"))))
' <<<"$j")
  grep -q CODE_FILE <<<"$fields" && grep -q PRIORITY <<<"$fields" ||
    { base_fail "the daemon's entries are not structured (fields: $fields)"; return 1; }
  guest_ssh 'journalctl --header --no-pager >/dev/null' || true
  base_log "$(wc -l <<<"$j") powermeterd entries from the previous boot, fields $fields; $(guest_ssh 'journalctl --disk-usage' | tr -d '\n')"
}

# The data partition: grown to the end of the (bigger) disk at first boot, machine-id kept there.
scenario_data-partition() {
  local size mid
  guest_layout
  size=$(guest_ssh 'blockdev --getsize64 /dev/disk/by-partlabel/data')
  [ "$size" -gt $((DATA_SIZE_MIB * 1048576)) ] ||
    { base_fail "data partition not grown: $size bytes (image: $DATA_SIZE_MIB MiB, disk is ${GUEST_GROW_MIB:-256} MiB bigger)"; return 1; }
  guest_ssh 'df -B1 --output=size /data | tail -n1 | awk -v p="$(blockdev --getsize64 /dev/disk/by-partlabel/data)" "{ exit !(\$1 > p * 0.8) }"' ||
    { base_fail "the ext4 file system on /data was not grown with its partition"; return 1; }
  mid=$(guest_ssh 'readlink /etc/machine-id; cat /data/machine-id')
  [ "$(head -n1 <<<"$mid")" = /data/machine-id ] && [[ $(tail -n1 <<<"$mid") =~ ^[0-9a-f]{32}$ ]] ||
    { base_fail "machine-id is not kept on /data: $mid"; return 1; }
  [ "$(tail -n1 <<<"$mid")" = "$(guest_ssh cat /etc/machine-id)" ] || { base_fail "/etc/machine-id is not /data/machine-id"; return 1; }
  base_log "data partition $((size / 1048576)) MiB (image $DATA_SIZE_MIB MiB); machine-id $(tail -n1 <<<"$mid") on /data"
}

SCENARIOS+=(boot-ready readonly-root data-partition hardening watchdog-restart persist-reboot journald verity-tamper)
