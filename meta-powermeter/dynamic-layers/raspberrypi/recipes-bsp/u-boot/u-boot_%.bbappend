# powermeter-os: squashfs support (the kernel lives in the slot) for the Raspberry Pi U-Boot.
FILESEXTRAPATHS:prepend:powermeter-os := "${THISDIR}/files:"

SRC_URI:append:powermeter-os:rpi = " file://powermeter-squashfs.cfg"
