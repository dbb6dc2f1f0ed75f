#!/usr/bin/env bash
# Buildroot post-build script of the powermeter appliance (BR2_ROOTFS_POST_BUILD_SCRIPT):
#   post-build.sh TARGET_DIR BOARD_DIR
# Installs the board's RAUC system.conf, the RAUC pre-install handler, the keyring, the image
# version in os-release, the mount points of fstab and /data, the provisioning files the
# Debian-built images have (images/qemu/rootfs/overlay), and the machine-id link:
# /etc/machine-id -> /data/machine-id (the data partition, mounted by the preinit before PID 1;
# rootfs-overlay/usr/libexec/powermeter/preinit), over an empty /data/machine-id in the root for a
# boot without the data partition (systemd then makes a transient id), and the SBOM at
# /usr/share/powermeter/sbom.cdx.json (see the end).
#
# Keyring: $POWERMETER_KEYRING (CA certificates + CRLs, PEM), else the development keyring that
# signing/dev-pki makes in the repository's build/ (run here when missing). Never a private key.
# Version: $POWERMETER_IMAGE_VERSION, else <crate version>-<git commit> of the repository.
set -euo pipefail

target=${1:?usage: post-build.sh TARGET_DIR BOARD_DIR}
board=${2:?usage: post-build.sh TARGET_DIR BOARD_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
build=${POWERMETER_BUILD_DIR:-$repo/build}

die() { echo "post-build.sh: $*" >&2; exit 1; }
[ -f "$board/system.conf" ] || die "$board/system.conf not found"

install -D -m 0644 "$board/system.conf" "$target/etc/rauc/system.conf"
install -D -m 0755 "$here/rauc/pre-install" "$target/usr/lib/rauc/pre-install"

keyring=${POWERMETER_KEYRING:-}
if [ -z "$keyring" ]; then
  keyring=$build/qemu/keyring/ca.cert.pem
  if [ ! -s "$keyring" ] && [ -x "$repo/signing/dev-pki" ]; then
    POWERMETER_BUILD_DIR=$build "$repo/signing/dev-pki" >/dev/null
  fi
fi
[ -s "$keyring" ] || die "no keyring at $keyring (run signing/dev-pki or set POWERMETER_KEYRING)"
if grep -q 'PRIVATE KEY' "$keyring"; then
  die "$keyring holds a private key: the keyring must hold certificates and CRLs only"
fi
install -D -m 0644 "$keyring" "$target/etc/rauc/keyring.pem"

compatible=$(sed -n 's/^compatible=//p' "$board/system.conf")
crate_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
version=${POWERMETER_IMAGE_VERSION:-${crate_version:-0}-$commit}
[[ $version =~ ^[A-Za-z0-9._+~-]+$ ]] || die "image version '$version' has characters a file name should not"
osr=$target/usr/lib/os-release
sed -i '/^IMAGE_ID=/d; /^IMAGE_VERSION=/d' "$osr"
printf 'IMAGE_ID=%s\nIMAGE_VERSION=%s\n' "$compatible" "$version" >> "$osr"
echo "$version" > "$target/etc/powermeter-image-version"

# every mount point of fstab exists in the read-only root
awk '$1 !~ /^#/ && $2 ~ /^\// { print $2 }' "$target/etc/fstab" | while read -r mp; do
  mkdir -p "$target$mp"
done

# per-device identity: nothing in the shared image. /etc/machine-id is the data partition's
# /data/machine-id (rm first: never write through the link, which points into the build host).
rm -f "$target/var/lib/dbus/machine-id" "$target/etc/machine-id" "$target/data/machine-id"
mkdir -p "$target/data"
: > "$target/data/machine-id"
chmod 0444 "$target/data/machine-id"
ln -s /data/machine-id "$target/etc/machine-id"
[ -x "$target/usr/libexec/powermeter/preinit" ] || die "no executable usr/libexec/powermeter/preinit (the kernel's init=)"

# What every powermeter image shares with the Debian-built ones (images/qemu/rootfs/overlay, the
# one source): the directories and per-device settings on /data, the first-boot import from the
# boot partition and powermeter-config, SSH only with a provisioned key (host key on /data),
# Wi-Fi through wpa_supplicant on wlan0 with the imported network.
shared=$repo/images/qemu/rootfs/overlay
install -D -m 0755 "$shared/usr/lib/powermeter/provision" "$target/usr/lib/powermeter/provision"
install -D -m 0755 "$shared/usr/bin/powermeter-config" "$target/usr/bin/powermeter-config"
for u in powermeter-data-layout.service powermeter-provision.service powermeter-ssh-hostkey.service; do
  install -D -m 0644 "$shared/usr/lib/systemd/system/$u" "$target/usr/lib/systemd/system/$u"
done
install -D -m 0644 "$shared/usr/lib/systemd/system/ssh.service.d/powermeter.conf" \
  "$target/usr/lib/systemd/system/sshd.service.d/powermeter.conf"
install -D -m 0644 "$shared/usr/lib/systemd/system/wpa_supplicant@.service.d/powermeter.conf" \
  "$target/usr/lib/systemd/system/wpa_supplicant@.service.d/powermeter.conf"
install -D -m 0644 "$shared/etc/ssh/sshd_config.d/powermeter.conf" "$target/etc/ssh/sshd_config.d/powermeter.conf"
install -D -m 0644 "$shared/etc/systemd/network/25-wireless.network" "$target/etc/systemd/network/25-wireless.network"
# upstream's sshd_config does not read the drop-in directory (Debian's and Yocto's do): first
if [ -f "$target/etc/ssh/sshd_config" ] && ! grep -q '^Include /etc/ssh/sshd_config.d/\*\.conf' "$target/etc/ssh/sshd_config"; then
  sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' "$target/etc/ssh/sshd_config"
fi
rm -f "$target"/etc/ssh/ssh_host_*
# host name, time zone and Wi-Fi network belong to the device: links into /data/etc/, as in
# every image
"$repo/images/common/device-links" "$target"

# SBOM (CycloneDX, Buildroot's own utils/generate-cyclonedx from `make show-info`: every package
# of the configuration with version, licenses, sources, patches) at the same path as in every
# powermeter image; post-image.sh puts copies next to the image and the bundle. It needs only
# the configuration. generate-cyclonedx fetches the SPDX license list schema into
# $BR2_DL_DIR/cyclonedx/ once; offline, put spdx-1.6.schema.json there (README "SBOM"). Without
# it the image is built without an SBOM, with a warning.
sbom=$target/usr/share/powermeter/sbom.cdx.json
rm -f "$sbom"
mkdir -p "$(dirname "$sbom")"
sub_make() { env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$CONFIG_DIR" -s --no-print-directory "$@"; }
show_info=${BUILD_DIR:-/tmp}/powermeter-show-info.json
if [ -z "${CONFIG_DIR:-}" ]; then
  echo "post-build.sh: WARNING: no SBOM (CONFIG_DIR not set: not run from Buildroot)" >&2
elif topdir=$(sub_make VARS=TOPDIR RAW_VARS=YES printvars | sed -n 's/^TOPDIR=//p') &&
     sub_make show-info >"$show_info" &&
     python3 "$topdir/utils/generate-cyclonedx" --project-name "$compatible" --project-version "$version" \
       -i "$show_info" -o "$sbom.tmp"; then
  mv "$sbom.tmp" "$sbom"
  echo "post-build.sh: SBOM /usr/share/powermeter/sbom.cdx.json"
  # generate-cyclonedx knows the daemon as one package; itemise its crates from the dependency
  # list embedded in the binary (package/powermeter), with Cargo.lock's checksums and the
  # vendored crates' licenses, by the tool of the same source tree as the binary.
  srcdir=$(sub_make VARS=POWERMETER_DIR printvars | sed -n 's/^POWERMETER_DIR=//p')
  [ -d "$srcdir" ] || die "no powermeter build directory ($srcdir) for the SBOM's crates"
  python3 "$srcdir/images/sbom/add-crates" --sbom "$sbom" --binary "$target/usr/bin/powermeterd" \
    --lock "$srcdir/Cargo.lock" --crates-dir "$srcdir/VENDOR" || die "could not add the daemon's crates to the SBOM"
else
  rm -f "$sbom.tmp"
  echo "post-build.sh: WARNING: no SBOM (utils/generate-cyclonedx failed; offline? see README \"SBOM\")" >&2
fi
