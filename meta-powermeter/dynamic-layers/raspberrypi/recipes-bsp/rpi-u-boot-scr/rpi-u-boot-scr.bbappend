# powermeter-os: A/B boot script with boot counting and a dm-verity root. The one U-Boot boot
# script of every powermeter image lives in images/common/u-boot/boot.cmd.in of this repository
# (next to the layer); meta-raspberrypi fills in KERNEL_IMAGETYPE, KERNEL_BOOTCMD and BOOT_MEDIA,
# this append the rest (images/common/u-boot/mkbootcmd documents each value).
FILESEXTRAPATHS:prepend:powermeter-os := "${POWERMETER_LAYERDIR}/../images/common/u-boot:"

do_compile:prepend:powermeter-os() {
    sed -i -e 's|@@ENV_FILE@@||g' \
        -e 's|@@KERNEL_SOURCE@@|slot|g' \
        -e 's|@@ROOT_STYLE@@|dm-init|g' \
        -e 's|@@LINUX_PART@@|${POWERMETER_PART}|g' \
        -e 's|@@VERITY_HASH_START@@|${pm_blocks}|g' \
        -e 's|@@VERITY_HASH_OFFSET@@|0|g' \
        -e 's|@@EXTRA_BOOTARGS@@||g' \
        "${UNPACKDIR}/boot.cmd.in"
}
