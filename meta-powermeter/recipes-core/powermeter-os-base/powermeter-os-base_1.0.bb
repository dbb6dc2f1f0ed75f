SUMMARY = "powermeter-os settings: data partition, overlays, watchdog, journal, mark-good"
DESCRIPTION = "Checks the data partition at boot (e2fsck settings), grows it at first boot, keeps /var/lib and /var/log on it, arms the hardware watchdog, caps the persistent journal and marks the booted RAUC slot good once powermeter.service is ready and healthy."
HOMEPAGE = "https://example.invalid/powermeter"
SECTION = "base"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

SRC_URI = "\
    file://50-powermeter-journal.conf \
    file://50-powermeter-watchdog.conf \
    file://boot.mount \
    file://e2fsck.conf \
    file://grow-data \
    file://mark-good \
    file://powermeter-grow-data.service \
    file://powermeter-mark-good.service \
"

S = "${UNPACKDIR}"

inherit systemd overlayfs

# Depends on the machine's bootloader.
PACKAGE_ARCH = "${MACHINE_ARCH}"

# Writable, persistent on /data (mounted before PID 1 by overlayfs-etc's preinit):
# the daemon's state (/var/lib/private/powermeter), RAUC's, and the journal.
OVERLAYFS_WRITABLE_PATHS[data] = "${localstatedir}/lib ${localstatedir}/log"

SYSTEMD_SERVICE:${PN} = "boot.mount powermeter-grow-data.service powermeter-mark-good.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install() {
    install -d ${D}${libexecdir}/powermeter
    install -m 0755 ${UNPACKDIR}/grow-data ${UNPACKDIR}/mark-good ${D}${libexecdir}/powermeter/
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${UNPACKDIR}/boot.mount ${UNPACKDIR}/powermeter-grow-data.service \
        ${UNPACKDIR}/powermeter-mark-good.service ${D}${systemd_system_unitdir}/
    install -d ${D}${systemd_unitdir}/system.conf.d ${D}${systemd_unitdir}/journald.conf.d
    install -m 0644 ${UNPACKDIR}/50-powermeter-watchdog.conf ${D}${systemd_unitdir}/system.conf.d/
    install -m 0644 ${UNPACKDIR}/50-powermeter-journal.conf ${D}${systemd_unitdir}/journald.conf.d/
    # the preinit's e2fsck of /data (files/overlayfs-etc-preinit.sh.in): no real-time clock
    install -D -m 0644 ${UNPACKDIR}/e2fsck.conf ${D}${sysconfdir}/e2fsck.conf
    install -d ${D}/data ${D}/boot
}

FILES:${PN} += "\
    ${systemd_unitdir}/system.conf.d \
    ${systemd_unitdir}/journald.conf.d \
    ${sysconfdir}/e2fsck.conf \
    /data \
    /boot \
"

RDEPENDS:${PN} = "\
    bash \
    curl \
    e2fsprogs-e2fsck \
    e2fsprogs-resize2fs \
    rauc \
    util-linux-partx \
    util-linux-sfdisk \
"
RDEPENDS:${PN}:append = " ${@'grub-editenv' if d.getVar('POWERMETER_BOOTLOADER') == 'grub' else 'libubootenv-bin u-boot-env'}"
