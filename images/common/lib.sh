# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # the builders set repo, out and version and read the array
# Shared by the Debian-package image builders (images/qemu/build, images/rpi4/build), sourced:
# what every appliance root gets from app/ and the update design, the mmdebstrap options, the
# dm-verity slot image and the data partition. Board-specific parts (bootloader, kernel,
# initramfs, disk) stay in each builder.
#
# Expects: $repo (the checkout), log() and die(); the layout variables (VERITY_*, SQUASHFS_COMP,
# SLOT_SIZE_MIB, DATA_SIZE_MIB) for image_slot and image_data.

# mmdebstrap options of every image: no recommends, no manuals, docs or translations (the
# copyright files stay: the SBOM's licences). Run mmdebstrap with INITRD=No in its environment:
# the kernel hooks then make no initramfs at package install time (each builder makes the one
# initramfs the image needs, once, with image_initramfs).
image_mmdebstrap_opts=(
  --mode=root --variant=minbase
  --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --skip=essential/unlink --skip=download/empty
)

# image_install_app ROOT IMAGE_ID SYSTEM_CONF OVERLAY...: the overlays (in order, later ones
# win), the daemon ($POWERMETERD_BIN) and the MQTT publisher ($POWERMETER_MQTT_BIN, by default
# the powermeter-mqtt beside it: the same cargo build) with their units, sysusers and udev files from app/, RAUC's
# SYSTEM_CONF with the handlers, hooks and mark-good unit of images/qemu/rauc/ (the same for
# every Debian-built image), the keyring, os-release with IMAGE_ID and $version, the enabled and
# masked units, per-device state on /data, a locked root. $image_default_config, when set, is
# the image's default daemon configuration instead of the overlays' one.
image_install_app() {
  local root=$1 image_id=$2 conf=$3 rauc=$repo/images/qemu/rauc f
  shift 3
  for f in "$@"; do cp -a "$f/." "$root/"; done
  if [ -n "${image_default_config:-}" ]; then
    install -D -m 0644 "$image_default_config" "$root/usr/share/powermeter/powermeter.toml"
  fi
  install -D -m 0755 "$POWERMETERD_BIN" "$root/usr/bin/powermeterd"
  install -D -m 0755 "${POWERMETER_MQTT_BIN:-$(dirname "$POWERMETERD_BIN")/powermeter-mqtt}" "$root/usr/bin/powermeter-mqtt"
  for f in "$repo"/app/systemd/*.service "$repo"/app/systemd/*.socket; do
    install -m 0644 "$f" "$root/usr/lib/systemd/system/"
  done
  install -D -m 0644 "$repo/app/systemd/sysusers.d/powermeter.conf" "$root/usr/lib/sysusers.d/powermeter.conf"
  install -D -m 0644 "$repo/app/systemd/udev/60-powermeter-gpio.rules" "$root/usr/lib/udev/rules.d/60-powermeter-gpio.rules"
  # RAUC: system.conf, the handlers and the mark-good unit
  install -D -m 0644 "$conf" "$root/etc/rauc/system.conf"
  for f in "$rauc"/hooks/*; do install -D -m 0755 "$f" "$root/usr/lib/rauc/$(basename "$f")"; done
  for f in "$rauc"/*.service; do
    [ -e "$f" ] || continue
    install -m 0644 "$f" "$root/usr/lib/systemd/system/"
    chroot "$root" systemctl enable "$(basename "$f")"
  done
  if [ -s "$out/keyring/ca.cert.pem" ]; then
    install -D -m 0644 "$out/keyring/ca.cert.pem" "$root/etc/rauc/keyring.pem"
  fi
  # the version of this image
  sed -i '/^IMAGE_ID=/d; /^IMAGE_VERSION=/d' "$root/usr/lib/os-release"
  { echo "IMAGE_ID=$image_id"; echo "IMAGE_VERSION=$version"; } >> "$root/usr/lib/os-release"
  sed -i "s/^VERSION_ID=.*/VERSION_ID=\"$version\"/" "$root/usr/lib/os-release"
  sed -i 's/^PRETTY_NAME=.*/PRETTY_NAME="powermeter appliance (Debian trixie based)"/' "$root/usr/lib/os-release"
  rm -f "$root/etc/os-release"; ln -s ../usr/lib/os-release "$root/etc/os-release"

  chroot "$root" systemd-sysusers
  # powermeter-mqtt.service idles (exits 0) until [mqtt] broker is configured
  chroot "$root" systemctl enable powermeter.service powermeter-mqtt.service powermeter-data-layout.service powermeter-machine-id-commit.service \
    powermeter-grow-data.service powermeter-provision.service systemd-networkd.service ssh.service
  if [ -e "$root/usr/lib/systemd/system/systemd-timesyncd.service" ]; then
    chroot "$root" systemctl enable systemd-timesyncd.service
  fi
  chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer dpkg-db-backup.timer systemd-firstboot.service ssh.socket wpa_supplicant.service \
    systemd-repart.service \
    2>/dev/null || true
  # per-device state lives on /data: machine-id, ssh host keys (none made here)
  rm -f "$root"/etc/ssh/ssh_host_*
  rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
  ln -s /data/machine-id "$root/etc/machine-id"
  # the device's daemon configuration lives on /data (seeded from /usr/share/powermeter/ by
  # powermeter-data-layout.service); the image carries only the default
  [ -s "$root/usr/share/powermeter/powermeter.toml" ] || die "no default /usr/share/powermeter/powermeter.toml"
  rm -rf "$root/etc/powermeter"
  mkdir -p "$root/etc/powermeter"
  ln -s /data/etc/powermeter/powermeter.toml "$root/etc/powermeter/powermeter.toml"
  # and so do its host name, time zone and Wi-Fi network (wpa_supplicant on wlan0 when it appears)
  "$repo/images/common/device-links" "$root"
  mkdir -p "$root/data"
  # no password anywhere: root stays locked
  chroot "$root" passwd -l root >/dev/null
}

# image_initramfs ROOT MODULE...: the one initramfs of the image (images/common/initramfs/: no
# udev, no systemd; it opens the slot under dm-verity and mounts /data) with the kernel modules
# named, at /boot/initrd.img-<kernel version>, with /boot/vmlinuz and /boot/initrd.img linking to it
image_initramfs() {
  local root=$1 kver
  shift
  kver=$(basename "$(find "$root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort | tail -n1)")
  log "initramfs for $kver"
  rm -f "$root"/boot/initrd.img-*
  "$repo/images/common/initramfs/mkinitramfs" "$root" "$root/boot/initrd.img-$kver" "$@"
  ln -sf "vmlinuz-$kver" "$root/boot/vmlinuz"
  ln -sf "initrd.img-$kver" "$root/boot/initrd.img"
}

# image_slot ROOT IMG: the slot image of ROOT (squashfs, zero padding, the dm-verity hash tree at
# VERITY_HASH_OFFSET), its root hash in IMG without .img + .roothash
image_slot() {
  local root=$1 img=$2 size blocks salt uuid roothash
  log "squashfs ($SQUASHFS_COMP)"
  rm -f "$img"
  mksquashfs "$root" "$img" -noappend -quiet -comp "$SQUASHFS_COMP" -b 131072 \
    -processors "$(nproc)" >/dev/null
  size=$(stat -c %s "$img")
  [ "$size" -le "$VERITY_HASH_OFFSET" ] || die "squashfs is $size bytes, more than VERITY_HASH_OFFSET $VERITY_HASH_OFFSET"
  blocks=$(( (size + VERITY_DATA_BLOCK_SIZE - 1) / VERITY_DATA_BLOCK_SIZE ))
  truncate -s "$VERITY_HASH_OFFSET" "$img"
  # salt and UUID derived from the squashfs instead of random: the same squashfs gives the same
  # slot image and root hash (reproducible; a salt unique to the content still defeats tables
  # precomputed for other images)
  salt=$(head -c "$size" "$img" | sha256sum | cut -d' ' -f1)
  uuid=$(printf 'powermeter verity uuid %s' "$salt" | sha256sum |
         sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
  veritysetup format "$img" "$img" --hash-offset="$VERITY_HASH_OFFSET" \
    --data-blocks="$blocks" --hash="$VERITY_HASH" --data-block-size="$VERITY_DATA_BLOCK_SIZE" \
    --hash-block-size="$VERITY_HASH_BLOCK_SIZE" --format=1 --salt="$salt" --uuid="$uuid" > "${img%.img}.verity.log"
  sed -n 's/^Root hash:[[:space:]]*//p' "${img%.img}.verity.log" > "${img%.img}.roothash"
  roothash=$(cat "${img%.img}.roothash")
  [ -n "$roothash" ] || die "veritysetup format gave no root hash"
  [ "$(stat -c %s "$img")" -le $((SLOT_SIZE_MIB * 1024 * 1024)) ] || die "slot image larger than the slot"
  log "slot image: squashfs $((size / 1048576)) MiB, root hash $roothash"
}

# image_data IMG: the data partition (ext4, label data) with its directory skeleton
image_data() {
  local img=$1 skel
  skel=$(mktemp -d)
  mkdir -p "$skel/var/log/journal" "$skel/var/lib" "$skel/var/tmp" "$skel/rauc"
  chmod 1777 "$skel/var/tmp"
  # systemd's first boot: PID 1 finds "uninitialized", makes the id and writes it here (persistent)
  echo uninitialized > "$skel/machine-id"
  rm -f "$img"
  mke2fs -q -t ext4 -L data -E root_owner=0:0 -d "$skel" "$img" "${DATA_SIZE_MIB}M"
  rm -rf "$skel"
}

# image_version: the image version (POWERMETER_IMAGE_VERSION, else <crate version>-<commit>)
image_version() {
  local crate_version commit
  crate_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" "$repo/app/Cargo.toml" | head -n1)
  commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "${POWERMETER_IMAGE_VERSION:-${crate_version:-0}-$commit}"
}
