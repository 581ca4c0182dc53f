"""The scsi-target command line: composes the STML and front-end processes."""
