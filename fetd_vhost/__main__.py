from fetd_vhost.cli import main

main()
