# Image conversion ".verity": <image>.<type>.verity is the image padded to 4 KiB blocks with
# its dm-verity hash tree appended (sha256, no superblock), made by scripts/powermeter-verity.
# Next to it, in IMGDEPLOYDIR (and DEPLOY_DIR_IMAGE):
#   <image>.<type>.verity-params   VERITY_* parameters (root hash, salt, sizes; KEY=VALUE)
#   <image>.<type>.roothash        the root hash alone (a bundle carries it as rootfs.roothash)
#   <image>.<type>.bootenv         slot A settings for the first boot (grubenv or U-Boot text),
#                                  by POWERMETER_BOOTLOADER (grub | uboot)
# Each also under the image's link name (IMAGE_LINK_NAME), which wic and the bundle use.
#
# Usage: IMAGE_FSTYPES += "squashfs.verity"

CONVERSIONTYPES:append = " verity"
POWERMETER_VERITY_TOOL = "${POWERMETER_LAYERDIR}/scripts/powermeter-verity"
POWERMETER_BOOTLOADER ??= "grub"

# nooelint: oelint.vars.specific
CONVERSION_CMD:verity = "powermeter_verity_convert ${IMAGE_NAME}.${type} ${IMAGE_LINK_NAME}.${type}"

powermeter_verity_convert[doc] = "Appends the dm-verity hash tree to an image and writes its settings"
powermeter_verity_convert() {
    in="$1"
    link="$2"
    python3 ${POWERMETER_VERITY_TOOL} format "$in" "$in.verity" "$in.verity-params"
    sed -n 's/^VERITY_ROOTHASH=//p' "$in.verity-params" > "$in.roothash"
    python3 ${POWERMETER_VERITY_TOOL} bootenv ${POWERMETER_BOOTLOADER} "$in.verity-params" "$in.bootenv"
    if [ "$link" != "$in" ]; then
        for ext in verity-params roothash bootenv; do
            ln -sf "$in.$ext" "$link.$ext"
        done
    fi
}
