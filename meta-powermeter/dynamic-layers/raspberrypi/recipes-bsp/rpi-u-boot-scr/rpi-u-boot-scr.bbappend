# powermeter-os: A/B boot script with boot counting and a dm-verity root (files/boot.cmd.in).
FILESEXTRAPATHS:prepend:powermeter-os := "${THISDIR}/files:"

do_compile:prepend:powermeter-os() {
    sed -i -e 's|@@POWERMETER_PART@@|${POWERMETER_PART}|g' "${UNPACKDIR}/boot.cmd.in"
}
