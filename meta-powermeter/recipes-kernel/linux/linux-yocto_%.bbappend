# powermeter-os: dm-verity root without initramfs, squashfs, overlayfs, watchdog, sandboxing.
FILESEXTRAPATHS:prepend:powermeter-os := "${THISDIR}/files:"

SRC_URI:append:powermeter-os = " file://powermeter-verity.cfg file://powermeter-sandbox.cfg"
SRC_URI:append:powermeter-os:qemuall = " file://powermeter-qemu-watchdog.cfg"
