from snapsync.cli.entry import main

main()
