SUMMARY = "Electricity meter pulse counter daemon"
DESCRIPTION = "powermeterd counts the pulses of an electricity meter on a GPIO line, keeps the counter across reboots, answers the old port 9001 protocol and serves Prometheus metrics and a health check over HTTP."
HOMEPAGE = "https://example.invalid/powermeter"
SECTION = "console/utils"
# The package's own license, and the licenses of the crates compiled into the binaries that
# MIT and Apache-2.0 do not cover (all in powermeter-mqtt: ring, rustls-webpki and untrusted are
# ISC, subtle BSD-3-Clause), with those crates' own license files; images/sbom/crate-licenses
# lists them and ci/check-yocto checks both against Cargo.toml and Cargo.lock.
LICENSE = "(MIT | Apache-2.0) & BSD-3-Clause & ISC"
# The license texts of the repository (relative to S, the top of the checkout: externalsrc,
# or the git fetcher's ${UNPACKDIR}/${BP}) and of the crates (where the crate fetcher unpacks
# them); ci/check-yocto checks the md5 sums.
LIC_FILES_CHKSUM = "\
    file://LICENSE-MIT;md5=871ab1cf0f4f4dc1295faf6475679a6d \
    file://LICENSE-APACHE;md5=3b83ef96387f14655fc854ddc3c6bd57 \
    file://${CARGO_VENDORING_DIRECTORY}/ring-0.17.14/LICENSE;md5=63da93c4c10a6b2ba3ffe61345c6c2d6 \
    file://${CARGO_VENDORING_DIRECTORY}/ring-0.17.14/LICENSE-BoringSSL;md5=bfca80950e49496c340e3327990eb7e7 \
    file://${CARGO_VENDORING_DIRECTORY}/ring-0.17.14/LICENSE-other-bits;md5=6c5d00879883ff640a11f53c7dd297fe \
    file://${CARGO_VENDORING_DIRECTORY}/rustls-webpki-0.102.8/LICENSE;md5=7fab7d7301efd548d76974e42a65f267 \
    file://${CARGO_VENDORING_DIRECTORY}/rustls-webpki-0.103.17/LICENSE;md5=7fab7d7301efd548d76974e42a65f267 \
    file://${CARGO_VENDORING_DIRECTORY}/subtle-2.6.1/LICENSE;md5=cff47234d8cf608834b44ad9405e5493 \
    file://${CARGO_VENDORING_DIRECTORY}/untrusted-0.9.0/LICENSE.txt;md5=79b08919d224b21c5a3de90b188adda4 \
"

PV = "0.1.0+git"

# Source: by default the repository this layer sits in (meta-powermeter/..), through
# externalsrc, so that the daemon, its units and Cargo.lock are those of the same checkout
# as powermeter-crates.inc. POWERMETER_SRCDIR points elsewhere (another checkout).
# For a build from a published commit instead, set in local.conf (README.md):
#   POWERMETER_GIT_URI = "git://HOST/PATH.git;protocol=https;branch=main"
#   SRCREV:pn-powermeter = "<commit>"
POWERMETER_SRCDIR ??= "${@os.path.dirname(d.getVar('POWERMETER_LAYERDIR'))}"
POWERMETER_GIT_URI ??= ""

# The crates of Cargo.lock (generated: meta-powermeter/scripts/gen-crates-inc), then the
# source (empty with externalsrc) and the default configuration.
require ${BPN}-crates.inc
SRC_URI += "\
    ${POWERMETER_GIT_URI} \
    file://powermeter.toml \
"

inherit cargo cargo-update-recipe-crates systemd useradd
inherit_defer ${@'externalsrc' if not d.getVar('POWERMETER_GIT_URI') else ''}

EXTERNALSRC ?= "${POWERMETER_SRCDIR}"
EXTERNALSRC_BUILD ?= "${WORKDIR}/build"

# The cargo workspace is at the top of the repository; the package is app/ (powermeterd).
CARGO_SRC_DIR = ""
CARGO_LOCK_SRC_DIR = "${S}"

# The image's default configuration: the Pi one (files/powermeter.toml: GPIO 27, also the
# Debian-built Pi image's and Buildroot's), on qemu the qemu appliance's simulated meter, the file
# images/qemu installs (one source each).
POWERMETER_DEFAULT_CONFIG ?= "${UNPACKDIR}/powermeter.toml"
POWERMETER_DEFAULT_CONFIG:qemuall ?= "${S}/images/qemu/rootfs/overlay/usr/share/powermeter/powermeter.toml"

# Cargo features: "gpio" (gpiocdev, the default) and "rppal" (Raspberry Pi only).
PACKAGECONFIG ??= ""
PACKAGECONFIG[rppal] = "--features rppal"

# Group of the GPIO character devices (app/systemd/udev); powermeter.service joins it.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system gpio"

PACKAGES =+ "${PN}-provision"

SYSTEMD_PACKAGES = "${PN} ${PN}-provision"
# powermeter-mqtt.service idles (exits 0) until [mqtt] broker is configured.
SYSTEMD_SERVICE:${PN} = "powermeter.socket powermeter-http.socket powermeter-reading.socket powermeter.service powermeter-mqtt.service powermeter-data-layout.service"
SYSTEMD_SERVICE:${PN}-provision = "powermeter-provision.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"
SYSTEMD_AUTO_ENABLE:${PN}-provision = "enable"

# The binaries (powermeterd, and powermeter-mqtt, the MQTT publisher; cargo_do_install installs
# both) carry their dependency list (ELF section .dep-v0) as cargo auditable writes it, so
# that cargo-audit, trivy, grype and syft read the crates from the file on the device. oe-core
# has no cargo-auditable: images/sbom/embed-audit-data writes the same section from cargo
# metadata with the target's objcopy (ci/check-supply-chain compares it with cargo auditable's).
do_compile:append() {
    python3 ${S}/images/sbom/embed-audit-data --cargo "${CARGO}" --objcopy "${OBJCOPY}" \
        ${PACKAGECONFIG_CONFARGS} --frozen --target ${RUST_HOST_SYS} \
        --manifest-path ${S}/app/Cargo.toml ${B}/target/${CARGO_TARGET_SUBDIR}/powermeterd \
        ${B}/target/${CARGO_TARGET_SUBDIR}/powermeter-mqtt
}

do_install:append() {
    # Every unit, sysusers and udev file of app/systemd/, unchanged: the same files in every image.
    install -d ${D}${systemd_system_unitdir}
    for f in ${S}/app/systemd/*.service ${S}/app/systemd/*.socket; do
        install -m 0644 "$f" ${D}${systemd_system_unitdir}/
    done
    if ls ${S}/app/systemd/sysusers.d/*.conf >/dev/null 2>&1; then
        install -d ${D}${nonarch_libdir}/sysusers.d
        install -m 0644 ${S}/app/systemd/sysusers.d/*.conf ${D}${nonarch_libdir}/sysusers.d/
    fi
    if ls ${S}/app/systemd/tmpfiles.d/*.conf >/dev/null 2>&1; then
        install -d ${D}${nonarch_libdir}/tmpfiles.d
        install -m 0644 ${S}/app/systemd/tmpfiles.d/*.conf ${D}${nonarch_libdir}/tmpfiles.d/
    fi
    if ls ${S}/app/systemd/udev/*.rules >/dev/null 2>&1; then
        install -d ${D}${nonarch_base_libdir}/udev/rules.d
        install -m 0644 ${S}/app/systemd/udev/*.rules ${D}${nonarch_base_libdir}/udev/rules.d/
    fi
    # The device's configuration lives on /data (as in every powermeter image): the daemon reads
    # /etc/powermeter/powermeter.toml, a link to /data/etc/powermeter/powermeter.toml, which
    # powermeter-data-layout.service (the qemu appliance's unit, the one source) seeds from this
    # default; it also makes the directories on /data the rest of the system relies on.
    install -D -m 0644 ${POWERMETER_DEFAULT_CONFIG} ${D}${datadir}/powermeter/powermeter.toml
    install -m 0644 ${S}/images/qemu/rootfs/overlay/usr/lib/systemd/system/powermeter-data-layout.service \
        ${D}${systemd_system_unitdir}/
    install -d ${D}${sysconfdir}/powermeter
    ln -sf /data/etc/powermeter/powermeter.toml ${D}${sysconfdir}/powermeter/powermeter.toml

    # Provisioning (powermeter-provision), as in every powermeter image: the first-boot import
    # from the boot partition, powermeter-config, SSH only with a provisioned key (host key on
    # /data), Wi-Fi through wpa_supplicant on wlan0. The files of the Debian-built images
    # (images/qemu/rootfs/overlay, the one source); sshd's unit is sshd.service here.
    ov=${S}/images/qemu/rootfs/overlay
    install -D -m 0755 $ov/usr/lib/powermeter/provision ${D}${nonarch_libdir}/powermeter/provision
    install -D -m 0755 $ov/usr/bin/powermeter-config ${D}${bindir}/powermeter-config
    install -m 0644 $ov/usr/lib/systemd/system/powermeter-provision.service \
        $ov/usr/lib/systemd/system/powermeter-ssh-hostkey.service ${D}${systemd_system_unitdir}/
    install -D -m 0644 $ov/usr/lib/systemd/system/ssh.service.d/powermeter.conf \
        ${D}${systemd_system_unitdir}/sshd.service.d/powermeter.conf
    install -D -m 0644 $ov/usr/lib/systemd/system/wpa_supplicant@.service.d/powermeter.conf \
        ${D}${systemd_system_unitdir}/wpa_supplicant@.service.d/powermeter.conf
    install -D -m 0644 $ov/etc/ssh/sshd_config.d/powermeter.conf ${D}${sysconfdir}/ssh/sshd_config.d/powermeter.conf
    install -D -m 0644 $ov/etc/systemd/network/25-wireless.network ${D}${sysconfdir}/systemd/network/25-wireless.network
}

FILES:${PN} += "\
    ${nonarch_libdir}/sysusers.d \
    ${nonarch_libdir}/tmpfiles.d \
    ${nonarch_base_libdir}/udev/rules.d \
"

FILES:${PN}-provision += "\
    ${nonarch_libdir}/powermeter/provision \
    ${bindir}/powermeter-config \
    ${systemd_system_unitdir}/powermeter-provision.service \
    ${systemd_system_unitdir}/powermeter-ssh-hostkey.service \
    ${systemd_system_unitdir}/sshd.service.d \
    ${systemd_system_unitdir}/wpa_supplicant@.service.d \
    ${sysconfdir}/ssh/sshd_config.d \
    ${sysconfdir}/systemd/network/25-wireless.network \
"
RDEPENDS:${PN}-provision = "\
    ${PN} \
    bash \
    coreutils \
    openssh-keygen \
    openssh-sshd \
    tzdata \
    util-linux-mountpoint \
"
