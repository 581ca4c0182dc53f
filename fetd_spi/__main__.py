from fetd_spi.cli import main

main()
