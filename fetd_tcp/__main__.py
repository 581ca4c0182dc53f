from fetd_tcp.cli import main

main(prog_name="python -m fetd_tcp")
