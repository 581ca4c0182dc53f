"""STML: the SCSI Target Mid-Level. Owns logical units and SCSI semantics;
knows nothing of transports, which reach it through the contract in stml.api."""

from scsi_runtime import accel as _accel

_accel.install()   # the compiled build, when asked for (SCSI_TARGET_ACCEL; decision 0830)
