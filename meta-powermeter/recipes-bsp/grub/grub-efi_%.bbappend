# powermeter-os: GRUB reads the kernel from the slot's squashfs and counts boots in grubenv.
GRUB_BUILDIN:append:powermeter-os = " squash4 regexp loadenv test echo sleep reboot"
