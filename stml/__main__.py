from stml.cli import main

main(prog_name="python -m stml")
