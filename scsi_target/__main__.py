from scsi_target.cli import main

main(prog_name="scsi-target")
