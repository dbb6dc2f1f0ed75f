"""The powermeter appliance under test: disks, guests and update bundles for the pytest +
labgrid system test (`ci/system-test`).

- `layout`: the repository's paths and the disk layout of `images/qemu/layout.env`.
- `disk`: pristine test disk (test key provisioned), qcow2 overlays, byte patches.
- `console`: a serial console log that is read continuously, with waits on it.
- `strategy`: the labgrid strategy that takes a target to off / shell / ready.
- `guest`: one appliance (qemu or a bench Pi) driven through labgrid: commands over SSH,
  reboots, power cuts, the ports 9001 and 9002 as the host sees them.
- `bundles`: signed RAUC test bundles and the HTTP server the guest streams them from.
"""
