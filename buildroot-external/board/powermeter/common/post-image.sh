#!/usr/bin/env bash
# Buildroot post-image script of the powermeter appliance (BR2_ROOTFS_POST_IMAGE_SCRIPT):
#   post-image.sh BINARIES_DIR BOARD_DIR
# 1. the slot image rootfs-slot.img: rootfs.squashfs, zero padding, then the dm-verity superblock
#    and hash tree at VERITY_HASH_OFFSET (BOARD_DIR/layout.env), and rootfs.verity (root hash,
#    salt, size) for the bootloader;
# 2. the boot files with slot A's first-boot settings: GRUB (BOARD_DIR/grub.cfg, grubenv) or
#    U-Boot (boot.scr from the one boot script of every U-Boot image, images/common/u-boot/,
#    with BOARD_DIR/boot.params; powermeter-bootenv.txt);
# 3. the disk image with genimage (BOARD_DIR/genimage.cfg): boot, rootfs-a, rootfs-b, data;
# 4. the signed RAUC bundle <compatible>-<version>.raucb (format verity), by signing/sign-bundle:
#    keys from POWERMETER_SIGNING_CERT / _KEY / _INTERMEDIATE and POWERMETER_KEYRING, else the
#    development PKI of signing/dev-pki (signing/README.md);
# 5. copies of the SBOM post-build.sh put in the root: sbom.cdx.json and <compatible>-<version>.cdx.json.
set -euo pipefail

bin=${1:?usage: post-image.sh BINARIES_DIR BOARD_DIR}
board=${2:?usage: post-image.sh BINARIES_DIR BOARD_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
export PATH="${HOST_DIR:?HOST_DIR not set (run from Buildroot)}/bin:$HOST_DIR/sbin:$PATH"

die() { echo "post-image.sh: $*" >&2; exit 1; }
# shellcheck source=/dev/null
. "$board/layout.env"
: "${VERITY_HASH_OFFSET:?}" "${VERITY_DATA_BLOCK_SIZE:?}" "${VERITY_HASH_BLOCK_SIZE:?}" "${VERITY_HASH:?}"
slot_bytes=$((SLOT_SIZE_MIB * 1024 * 1024))

# ---- 1. slot image ---------------------------------------------------------------------------
squashfs=$bin/rootfs.squashfs
[ -f "$squashfs" ] || die "$squashfs not found (BR2_TARGET_ROOTFS_SQUASHFS)"
size=$(stat -c %s "$squashfs")
[ "$size" -le "$VERITY_HASH_OFFSET" ] || die "the squashfs is $size bytes, more than VERITY_HASH_OFFSET $VERITY_HASH_OFFSET"
blocks=$(((size + VERITY_DATA_BLOCK_SIZE - 1) / VERITY_DATA_BLOCK_SIZE))
slot=$bin/rootfs-slot.img
cp "$squashfs" "$slot"
truncate -s "$VERITY_HASH_OFFSET" "$slot"
# salt and UUID derived from the squashfs (as images/common/lib.sh and Yocto's powermeter-verity
# do), not drawn at random: the same squashfs gives the same slot image and root hash
salt=$(sha256sum "$squashfs" | cut -d' ' -f1)
uuid=$(printf 'powermeter verity uuid %s' "$salt" | sha256sum |
       sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
veritysetup format "$slot" "$slot" --hash-offset="$VERITY_HASH_OFFSET" --data-blocks="$blocks" \
  --hash="$VERITY_HASH" --data-block-size="$VERITY_DATA_BLOCK_SIZE" \
  --hash-block-size="$VERITY_HASH_BLOCK_SIZE" --format=1 --salt="$salt" --uuid="$uuid" > "$bin/verity.log"
roothash=$(sed -n 's/^Root hash:[[:space:]]*//p' "$bin/verity.log")
salt=$(sed -n 's/^Salt:[[:space:]]*//p' "$bin/verity.log")
[[ $roothash =~ ^[0-9a-f]{64}$ && $salt =~ ^[0-9a-f]{64}$ ]] || die "no root hash or salt from veritysetup (see $bin/verity.log)"
[ "$(stat -c %s "$slot")" -le "$slot_bytes" ] || die "the slot image is larger than the slot ($SLOT_SIZE_MIB MiB)"
veritysetup verify "$slot" "$slot" "$roothash" --hash-offset="$VERITY_HASH_OFFSET" ||
  die "the slot image does not verify against its root hash"
sectors=$((blocks * VERITY_DATA_BLOCK_SIZE / 512))
printf 'VERITY_ROOTHASH=%s\nVERITY_SALT=%s\nVERITY_DATA_BLOCKS=%s\nVERITY_DATA_SECTORS=%s\nVERITY_HASH_OFFSET=%s\n' \
  "$roothash" "$salt" "$blocks" "$sectors" "$VERITY_HASH_OFFSET" > "$bin/rootfs.verity"
echo "$roothash" > "$bin/rootfs.roothash"
echo "post-image.sh: slot image: squashfs $((size / 1048576)) MiB, root hash $roothash"

# ---- 2. boot files ---------------------------------------------------------------------------
genimage_cfg=$bin/genimage.cfg
if [ -f "$board/grub.cfg" ]; then
  efi=$bin/efi-part/EFI/BOOT
  [ -f "$efi/bootx64.efi" ] || die "$efi/bootx64.efi not found (BR2_TARGET_GRUB2_X86_64_EFI)"
  install -m 0644 "$board/grub.cfg" "$efi/grub.cfg"
  rm -f "$efi/grubenv"
  grub-editenv "$efi/grubenv" create
  grub-editenv "$efi/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0 \
    A_ROOTHASH="$roothash" A_VERITY_SECTORS="$sectors" A_VERITY_BLOCKS="$blocks" A_VERITY_SALT="$salt"
  cp "$board/genimage.cfg" "$genimage_cfg"
elif [ -f "$board/boot.params" ]; then
  # mkimage -A of boot.scr: the board's architecture as its defconfig sets it (one source, no
  # per-board copy): arm64 for BR2_aarch64 (rpi4_64), arm for 32-bit BR2_arm (rpi0w)
  arch=arm
  grep -q '^BR2_aarch64=y' "${BR2_CONFIG:?BR2_CONFIG not set}" && arch=arm64
  # mkimage of host-uboot-tools (BR2_PACKAGE_HOST_UBOOT_TOOLS), first in PATH
  "$repo/images/common/u-boot/mkbootcmd" --arch "$arch" --params "$board/boot.params" \
    --out "$bin/boot.cmd" --scr "$bin/boot.scr" || die "could not make boot.scr"
  [ -f "$bin/u-boot.bin" ] || die "$bin/u-boot.bin not found (BR2_TARGET_UBOOT)"
  # imported by boot.scr while uboot.env does not exist yet (first boot)
  printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_A_ROOTHASH=%s\nBOOT_A_VERITY_SECTORS=%s\nBOOT_A_VERITY_BLOCKS=%s\nBOOT_A_VERITY_SALT=%s\n' \
    "$roothash" "$sectors" "$blocks" "$salt" > "$bin/powermeter-bootenv.txt"
  files=()
  for f in "$bin"/rpi-firmware/* "$bin"/*.dtb "$bin/u-boot.bin" "$bin/boot.scr" "$bin/powermeter-bootenv.txt"; do
    [ -e "$f" ] && files+=("${f#"$bin"/}")
  done
  list=$(printf '\t\t\t"%s",\n' "${files[@]}")
  awk -v list="$list" '$0 == "#BOOT_FILES#" { print list; next } { print }' "$board/genimage.cfg" > "$genimage_cfg"
else
  die "$board has neither grub.cfg nor boot.params"
fi

# ---- 3. disk image ---------------------------------------------------------------------------
# Buildroot runs this script from its top directory
"$PWD/support/scripts/genimage.sh" -c "$genimage_cfg"

# ---- 4. signed bundle ------------------------------------------------------------------------
compatible=$(sed -n 's/^compatible=//p' "$board/system.conf")
version=$(sed -n 's/^IMAGE_VERSION=//p' "${TARGET_DIR:?}/usr/lib/os-release" | tail -n1)
{ [ -n "$compatible" ] && [ -n "$version" ]; } || die "no compatible in $board/system.conf or no IMAGE_VERSION in os-release"
content=$(mktemp -d "${BUILD_DIR:-/tmp}/powermeter-bundle.XXXXXX")
trap 'rm -rf "$content"' EXIT
ln "$slot" "$content/rootfs.img" 2>/dev/null || cp "$slot" "$content/rootfs.img"
cp "$bin/rootfs.verity" "$bin/rootfs.roothash" "$content/"
install -m 0755 "$here/rauc/hook" "$content/hook"
cat > "$content/manifest.raucm" <<MF
[update]
compatible=$compatible
version=$version
description=powermeter appliance ($compatible, Buildroot)
build=$(date -u +%Y%m%dT%H%M%SZ) $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)

[bundle]
format=verity

[hooks]
filename=hook

[image.rootfs]
filename=rootfs.img
hooks=post-install

[meta.powermeter]
rootfs-roothash=$roothash
verity-hash-offset=$VERITY_HASH_OFFSET
MF
"$repo/signing/sign-bundle" "$content" "$bin/$compatible-$version.raucb"
echo "post-image.sh: $bin/$compatible-$version.raucb"

# ---- 5. SBOM next to the image and the bundle (post-build.sh wrote it into the root) -----------
if [ -s "${TARGET_DIR:?}/usr/share/powermeter/sbom.cdx.json" ]; then
  install -m 0644 "$TARGET_DIR/usr/share/powermeter/sbom.cdx.json" "$bin/sbom.cdx.json"
  install -m 0644 "$TARGET_DIR/usr/share/powermeter/sbom.cdx.json" "$bin/$compatible-$version.cdx.json"
  echo "post-image.sh: SBOM $bin/sbom.cdx.json, $bin/$compatible-$version.cdx.json"
else
  echo "post-image.sh: WARNING: no SBOM in the root (see post-build.sh)" >&2
fi
