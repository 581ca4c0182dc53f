"""fetd_vhost: a vhost-user-scsi front end that serves the STML's LUNs to QEMU guests."""
