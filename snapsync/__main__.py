import sys

if sys.argv[1:2] == ["serve"]:
    from snapsync.replication.serve import main as serve_main

    code = serve_main(sys.argv[2:])
    if code >= 0:
        sys.exit(code)

from snapsync.cli.app import main

main()
