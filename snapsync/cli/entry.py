"""The ``snapsync`` command's entry point, before anything heavy is imported.

Every replication session is a ``snapsync serve``: an ssh forced command on a backup host, or the
child a local target starts. Its start-up is paid per session, so it must not load the command
line's libraries (typer, rich, pydantic: about 130 ms): ``serve`` is dispatched here, and everything
else goes to :mod:`snapsync.cli.app`.
"""

from __future__ import annotations

import sys
from typing import NoReturn


def main() -> NoReturn:
    args = sys.argv[1:]
    if args[:1] == ["serve"]:
        from snapsync.replication.serve import main as serve_main

        code = serve_main(args[1:])
        if code >= 0:
            sys.exit(code)  # anything unusual (help, a bad option) is the full CLI's to answer
    from snapsync.cli.app import main as app_main

    app_main(args)
