"""fetd_vhost: a vhost-user-scsi front end that serves the STML's LUNs to QEMU guests."""

from scsi_runtime import accel as _accel

_accel.install()   # the compiled build, when asked for (SCSI_TARGET_ACCEL; decision 0830)
