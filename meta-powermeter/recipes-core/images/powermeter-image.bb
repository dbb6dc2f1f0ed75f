SUMMARY = "powermeter appliance: SD card / disk image"
DESCRIPTION = "Read-only squashfs root under dm-verity in A/B slots updated by RAUC, a writable data partition, systemd with the hardware watchdog armed, powermeterd, first-boot provisioning from the boot partition. No root password, SSH only with a provisioned key."
HOMEPAGE = "https://example.invalid/powermeter"
SECTION = "images"
LICENSE = "MIT"

inherit core-image

# No debug-tweaks, empty-root-password or ssh-server-*: root's password stays locked and
# nothing listens but powermeter's sockets and, once the owner's key is provisioned
# (powermeter-provision), sshd. /data is mounted by overlayfs-etc's preinit, before PID 1, and
# carries the /etc overlay (machine-id, network).
IMAGE_FEATURES = "read-only-rootfs overlayfs-etc"

IMAGE_INSTALL = "\
    packagegroup-core-boot \
    kernel-image \
    powermeter \
    powermeter-os-base \
    powermeter-provision \
    rauc \
    ${CORE_IMAGE_EXTRA_INSTALL} \
"
# Wi-Fi on the Pis that have it (POWERMETER_WIFI_PACKAGES, per machine in
# powermeter-os-machines.inc): wpa_supplicant on wlan0 with the network from the first-boot
# import, the regulatory database, the BSP's firmware for the machine's chip.
IMAGE_INSTALL += "${POWERMETER_WIFI_PACKAGES}"
IMAGE_LINGUAS = ""

# Host name, time zone and Wi-Fi network belong to the device, on /data (seeded by
# powermeter-data-layout.service, set by the first-boot import): links in the read-only root.
ROOTFS_POSTPROCESS_COMMAND += "powermeter_device_links"
POWERMETER_DEVICE_LINKS = "${@os.path.dirname(d.getVar('POWERMETER_LAYERDIR'))}/images/common/device-links"
do_rootfs[file-checksums] += "${POWERMETER_DEVICE_LINKS}:True"
powermeter_device_links[doc] = "Links /etc/hostname, /etc/localtime and wlan0's wpa_supplicant configuration to /data/etc/, starts wpa_supplicant when wlan0 appears (images/common/device-links, the script of every image)"
powermeter_device_links() {
    ${POWERMETER_DEVICE_LINKS} ${IMAGE_ROOTFS}
}
# meta-rauc's rauc-mark-good marks every boot good at once; powermeter-os-base's
# powermeter-mark-good does it only when powermeter is ready and healthy.
BAD_RECOMMENDATIONS += "rauc-mark-good"

# Root file system: squashfs + dm-verity hash tree (classes/powermeter_verity.bbclass),
# written into slot A of the wic image and into every bundle.
IMAGE_FSTYPES = "squashfs.verity wic wic.bmap"
# nooelint: oelint.vars.specific
IMAGE_TYPEDEP:wic = "squashfs.verity"
# nooelint: oelint.vars.mispell.unknown
do_image_squashfs[file-checksums] += "${POWERMETER_LAYERDIR}/scripts/powermeter-verity:True"

POWERMETER_SLOT_SIZE ?= "768M"
POWERMETER_DATA_SIZE ?= "128M"
WKS_FILE_DEPENDS:append = " ${@'grub-efi' if d.getVar('POWERMETER_BOOTLOADER') == 'grub' else ''}"

# First boot: slot A's verity settings on the boot partition.
IMAGE_EFI_BOOT_FILES:append = " ${@'${IMGDEPLOYDIR}/${IMAGE_LINK_NAME}.squashfs.bootenv;EFI/BOOT/grubenv' if d.getVar('POWERMETER_BOOTLOADER') == 'grub' else ''}"
IMAGE_BOOT_FILES:append = " ${@'${IMGDEPLOYDIR}/${IMAGE_LINK_NAME}.squashfs.bootenv;powermeter-bootenv.txt' if d.getVar('POWERMETER_BOOTLOADER') == 'uboot' else ''}"
