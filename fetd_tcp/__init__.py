"""iSCSI front end: sans-IO protocol core (PDU codec, negotiation, login, CHAP)."""

from scsi_runtime import accel as _accel

_accel.install()   # the compiled build, when asked for (SCSI_TARGET_ACCEL; decision 0830)
