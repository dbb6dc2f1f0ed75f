# powermeter-os: dm-verity root without initramfs, squashfs, overlayfs, BCM2835 watchdog.
FILESEXTRAPATHS:prepend:powermeter-os := "${POWERMETER_LAYERDIR}/recipes-kernel/linux/files:${THISDIR}/files:"

SRC_URI:append:powermeter-os = " file://powermeter-verity.cfg file://powermeter-sandbox.cfg file://powermeter-rpi-watchdog.cfg"
