SUMMARY = "powermeter appliance: signed RAUC update bundle (verity format)"
DESCRIPTION = "The root file system of powermeter-image (squashfs + dm-verity hash tree) for the inactive A/B slot, with the hook that hands its verity root hash to the bootloader."
HOMEPAGE = "https://example.invalid/powermeter"
SECTION = "images"
LICENSE = "MIT"

inherit bundle

RAUC_BUNDLE_FORMAT = "verity"
RAUC_BUNDLE_COMPATIBLE = "${POWERMETER_RAUC_COMPATIBLE}"
RAUC_BUNDLE_VERSION = "${DISTRO_VERSION}"
RAUC_BUNDLE_DESCRIPTION = "powermeter-os ${DISTRO_VERSION} for ${MACHINE}"

RAUC_BUNDLE_SLOTS = "rootfs"
RAUC_SLOT_rootfs = "powermeter-image"
RAUC_SLOT_rootfs[fstype] = "squashfs.verity"
RAUC_SLOT_rootfs[hooks] = "post-install"

SRC_URI = "file://hook"
RAUC_BUNDLE_HOOKS[file] = "hook"

# rootfs.verity / rootfs.roothash: the verity settings the hook stores for the bootloader.
RAUC_BUNDLE_EXTRA_DEPENDS += "powermeter-image:do_image_complete"
RAUC_BUNDLE_EXTRA_FILES += "rootfs.verity rootfs.roothash"

do_configure[prefuncs] += "powermeter_bundle_verity_files"
powermeter_bundle_verity_files[doc] = "Copies the image's verity settings into the bundle as rootfs.verity and rootfs.roothash"
python powermeter_bundle_verity_files() {
    import shutil
    base = "powermeter-image%s%s.squashfs" % (d.getVar('IMAGE_MACHINE_SUFFIX'), d.getVar('IMAGE_NAME_SUFFIX'))
    deploy = d.getVar('DEPLOY_DIR_IMAGE')
    unpack = d.getVar('UNPACKDIR')
    shutil.copyfile(os.path.join(deploy, base + '.verity-params'), os.path.join(unpack, 'rootfs.verity'))
    shutil.copyfile(os.path.join(deploy, base + '.roothash'), os.path.join(unpack, 'rootfs.roothash'))
}

# The bundle's SBOM: the SPDX 3.0 document oe-core's create-spdx wrote for the image the bundle
# carries, deployed next to it as <bundle name>.spdx.json (link <bundle link name>.spdx.json).
do_deploy[depends] += "powermeter-image:do_create_image_sbom_spdx"
do_deploy:append() {
    install -m 0644 ${DEPLOY_DIR_IMAGE}/powermeter-image${IMAGE_MACHINE_SUFFIX}${IMAGE_NAME_SUFFIX}.spdx.json \
        ${DEPLOYDIR}/${BUNDLE_NAME}.spdx.json
    ln -sf ${BUNDLE_NAME}.spdx.json ${DEPLOYDIR}/${BUNDLE_LINK_NAME}.spdx.json
}
