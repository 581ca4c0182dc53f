"""STML: the SCSI Target Mid-Level. Owns logical units and SCSI semantics;
knows nothing of transports, which reach it through the contract in stml.api."""
