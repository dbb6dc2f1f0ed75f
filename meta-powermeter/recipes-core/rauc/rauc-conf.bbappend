# powermeter-os: system.conf from the machine's bootloader and disk (POWERMETER_BOOTLOADER,
# POWERMETER_PART), compatible powermeter-<machine>, and the keyring from RAUC_KEYRING_FILE
# (set in local.conf or kas, see meta-powermeter/README.md; never committed) installed as
# /usr/lib/rauc/keyring.pem.
FILESEXTRAPATHS:prepend:powermeter-os := "${THISDIR}/files:"

SRC_URI:append:powermeter-os = " file://system-${POWERMETER_BOOTLOADER}.conf.in"

PACKAGE_ARCH:powermeter-os = "${MACHINE_ARCH}"

do_install:prepend:powermeter-os() {
    sed -e 's|@COMPATIBLE@|${POWERMETER_RAUC_COMPATIBLE}|' -e 's|@PART@|${POWERMETER_PART}|g' \
        ${UNPACKDIR}/system-${POWERMETER_BOOTLOADER}.conf.in > ${UNPACKDIR}/system.conf
}

do_install:append:powermeter-os() {
    keyring=$(basename ${RAUC_KEYRING_FILE})
    if [ "$keyring" != keyring.pem ]; then
        mv ${D}${nonarch_libdir}/rauc/$keyring ${D}${nonarch_libdir}/rauc/keyring.pem
    fi
}
