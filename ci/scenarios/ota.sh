# shellcheck shell=bash
# OTA scenarios of ci/system-test (sourced by it, after ci/lib/guest.sh).
# Each runs against the booted qemu guest, installs real signed RAUC bundles and reboots
# through GRUB's A/B boot counting. Scenario functions return non-zero with a reason on
# stderr (the harness prints FAIL <name>: <why>).
#
# Test bundles are made from the build's slot image (build/qemu/rootfs.img) by repacking
# its squashfs with another version in os-release (and, for the "unhealthy" variant, a
# powermeterd that exits at once), then formatting a fresh dm-verity tree at
# VERITY_HASH_OFFSET and signing with the dev PKI: real bootable roots, each with its own
# verity tree and root hash. They are cached under build/qemu/ota/.

OTA_REPO=${OTA_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
OTA_BUILD=${POWERMETER_BUILD_DIR:-$OTA_REPO/build}
OTA_CACHE=$OTA_BUILD/qemu/ota
OTA_COMPATIBLE=powermeter-qemu-x86_64

ota_log() { echo "  [ota $(date -u +%H:%M:%S)] $*" >&2; }
ota_fail() { echo "$*" >&2; return 1; }

# --- test bundles (host side) ---------------------------------------------------------------

# ota_layout: sets OTA_OFFSET from images/qemu/layout.env
ota_layout() {
  local layout=${POWERMETER_LAYOUT_ENV:-$OTA_REPO/images/qemu/layout.env}
  # shellcheck source=/dev/null
  OTA_OFFSET=$(. "$layout" && echo "${VERITY_HASH_OFFSET:?}")
}

# ota_base_version: IMAGE_VERSION (else VERSION_ID) of the built slot image
ota_os_release_version() { # DIR
  local f
  for f in "$1/etc/os-release" "$1/usr/lib/os-release"; do
    if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
    sed -n 's/^IMAGE_VERSION="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$f" | head -n1
    return 0
  done
}

# ota_repack SRC_IMG OUT_IMG VERSION [unhealthy|normal]: write OUT_IMG and OUT_IMG%.img.roothash
ota_repack() {
  local src=$1 out=$2 version=$3 variant=${4:-normal} tree comp bs f old
  ota_layout
  tree=$(mktemp -d "${TMPDIR:-/tmp}/ota-tree.XXXXXX")
  rm -rf "$tree"
  unsquashfs -q -n -d "$tree" "$src" >/dev/null || { rm -rf "$tree"; ota_fail "unsquashfs $src failed"; return 1; }
  old=$(ota_os_release_version "$tree")
  [ -n "$old" ] || { rm -rf "$tree"; ota_fail "no IMAGE_VERSION in the image's os-release"; return 1; }
  for f in "$tree/etc/os-release" "$tree/usr/lib/os-release"; do
    if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
    sed -i "s/^IMAGE_VERSION=.*/IMAGE_VERSION=$version/" "$f"
  done
  if [ "$variant" = unhealthy ]; then
    # A broken build: the daemon exits at once, so it is never ready nor healthy.
    [ -x "$tree/usr/bin/powermeterd" ] || { rm -rf "$tree"; ota_fail "no /usr/bin/powermeterd in $src"; return 1; }
    printf '#!/bin/sh\necho "powermeterd: deliberately broken test build %s" >&2\nexit 1\n' "$version" \
      > "$tree/usr/bin/powermeterd"
    chmod 0755 "$tree/usr/bin/powermeterd"
  fi
  comp=$(unsquashfs -s "$src" | sed -n 's/^Compression //p')
  bs=$(unsquashfs -s "$src" | sed -n 's/^Block size //p')
  rm -f "$out"
  mksquashfs "$tree" "$out" -noappend -quiet -comp "${comp:-zstd}" -b "${bs:-131072}" \
    -processors "$(nproc)" >/dev/null || { rm -rf "$tree"; ota_fail "mksquashfs failed"; return 1; }
  rm -rf "$tree"
  local size blocks hashalg dbs hbs htype
  size=$(stat -c %s "$out")
  [ "$size" -le "$OTA_OFFSET" ] || { ota_fail "repacked squashfs ($size) is larger than VERITY_HASH_OFFSET ($OTA_OFFSET)"; return 1; }
  blocks=$(( (size + 4095) / 4096 ))
  local dump; dump=$(veritysetup dump --hash-offset="$OTA_OFFSET" "$src")
  hashalg=$(sed -n 's/^Hash algorithm:[[:space:]]*//p' <<<"$dump")
  dbs=$(sed -n 's/^Data block size:[[:space:]]*//p' <<<"$dump")
  hbs=$(sed -n 's/^Hash block size:[[:space:]]*//p' <<<"$dump")
  htype=$(sed -n 's/^Hash type:[[:space:]]*//p' <<<"$dump")
  blocks=$(( (size + ${dbs:-4096} - 1) / ${dbs:-4096} ))
  truncate -s "$OTA_OFFSET" "$out"
  veritysetup format "$out" "$out" --hash-offset="$OTA_OFFSET" --data-blocks="$blocks" \
    --hash="${hashalg:-sha256}" --data-block-size="${dbs:-4096}" --hash-block-size="${hbs:-4096}" \
    --format="${htype:-1}" | sed -n 's/^Root hash:[[:space:]]*//p' > "${out%.img}.roothash"
  [ -s "${out%.img}.roothash" ] || { ota_fail "veritysetup format failed"; return 1; }
}

# ota_bundle VERSION [unhealthy|normal] [COMPATIBLE]: path of a signed bundle (cached)
ota_bundle() {
  local version=$1 variant=${2:-normal} compatible=${3:-$OTA_COMPATIBLE}
  local dir=$OTA_CACHE/$variant-$version
  local out=$dir/$compatible-$version.raucb
  if [ ! -s "$out" ] || [ "$out" -ot "$OTA_BUILD/qemu/rootfs.img" ]; then
    mkdir -p "$dir"
    ota_log "making bundle $version ($variant, $compatible)"
    ota_repack "$OTA_BUILD/qemu/rootfs.img" "$dir/rootfs.img" "$version" "$variant" || return 1
    "$OTA_REPO/images/qemu/bundle" --rootfs "$dir/rootfs.img" --version "$version" \
      --compatible "$compatible" --output "$out" >"$dir/bundle.log" 2>&1 ||
      { ota_fail "images/qemu/bundle failed: $(tail -n3 "$dir/bundle.log")"; return 1; }
    rm -f "$dir/rootfs.img"
  fi
  echo "$out"
}
