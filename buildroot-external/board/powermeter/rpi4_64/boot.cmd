# powermeter boot script (U-Boot, Raspberry Pi 4, Buildroot): A/B slots with boot counting as
# RAUC's uboot backend expects (BOOT_ORDER, BOOT_A_LEFT, BOOT_B_LEFT in uboot.env on the boot
# partition), and a dm-verity root whose settings (BOOT_<slot>_ROOTHASH, _VERITY_SECTORS,
# _VERITY_BLOCKS, _VERITY_SALT) post-image.sh (slot A) and the signed bundle's slot hook (every
# update) wrote. The kernel lives in the slot: /boot/Image of its squashfs. The hash tree of a
# slot starts at block 155649 = VERITY_HASH_OFFSET / 4096 + 1 (layout.env). init= is the preinit
# that mounts the data partition (powermeter.data=, p4) on /data before systemd: /etc/machine-id
# links to /data/machine-id.

fdt addr ${fdt_addr} && fdt get value bootargs /chosen bootargs

# First boot: slot A's settings as built into this image (no uboot.env yet).
if test -z "${BOOT_ORDER}"; then
  if load mmc 0:1 ${ramdisk_addr_r} powermeter-bootenv.txt; then
    env import -t ${ramdisk_addr_r} ${filesize}
  fi
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 0
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 0

setenv pm_slot
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test -n "${pm_slot}"; then
    # a slot is chosen: skip the others
  elif test "${BOOT_SLOT}" = "A" && test -n "${BOOT_A_ROOTHASH}" && itest ${BOOT_A_LEFT} -gt 0; then
    setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
    setenv pm_slot A
  elif test "${BOOT_SLOT}" = "B" && test -n "${BOOT_B_ROOTHASH}" && itest ${BOOT_B_LEFT} -gt 0; then
    setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
    setenv pm_slot B
  fi
done

if test -z "${pm_slot}"; then
  # No slot has a try left: boot the first one of BOOT_ORDER anyway, uncounted, so that the
  # device stays reachable for repair (powermeter-mark-good does not reboot it again).
  echo "powermeter: no slot has a boot attempt left"
  for BOOT_SLOT in "${BOOT_ORDER}"; do
    if test -z "${pm_slot}"; then
      if test "${BOOT_SLOT}" = "A" && test -n "${BOOT_A_ROOTHASH}"; then
        setenv pm_slot A
      elif test "${BOOT_SLOT}" = "B" && test -n "${BOOT_B_ROOTHASH}"; then
        setenv pm_slot B
      fi
    fi
  done
fi

if test "${pm_slot}" = "A"; then
  setenv pm_part 2
  setenv pm_hash "${BOOT_A_ROOTHASH}"
  setenv pm_sectors "${BOOT_A_VERITY_SECTORS}"
  setenv pm_blocks "${BOOT_A_VERITY_BLOCKS}"
  setenv pm_salt "${BOOT_A_VERITY_SALT}"
elif test "${pm_slot}" = "B"; then
  setenv pm_part 3
  setenv pm_hash "${BOOT_B_ROOTHASH}"
  setenv pm_sectors "${BOOT_B_VERITY_SECTORS}"
  setenv pm_blocks "${BOOT_B_VERITY_BLOCKS}"
  setenv pm_salt "${BOOT_B_VERITY_SALT}"
else
  echo "powermeter: no bootable slot (no root hash in the environment)"
  sleep 10
  reset
fi

setenv pm_dev "/dev/mmcblk0p${pm_part}"
echo "powermeter: booting slot ${pm_slot} (${pm_dev}), BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT}"
setenv bootargs "${bootargs} root=/dev/dm-0 ro rootfstype=squashfs rootwait dm-mod.waitfor=${pm_dev} dm-mod.create=\"vroot,,,ro,0 ${pm_sectors} verity 1 ${pm_dev} ${pm_dev} 4096 4096 ${pm_blocks} 155649 sha256 ${pm_hash} ${pm_salt} 1 restart_on_corruption\" rauc.slot=${pm_slot} init=/usr/libexec/powermeter/preinit powermeter.data=/dev/mmcblk0p4 panic=10"
# Persist the decremented count before the kernel runs.
saveenv

load mmc 0:${pm_part} ${kernel_addr_r} /boot/Image
booti ${kernel_addr_r} - ${fdt_addr}
