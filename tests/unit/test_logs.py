"""Log set-up: snapsync's own steps with -v, library chatter only with --debug."""

from __future__ import annotations

import logging

import pytest

from snapsync.host.logs import setup


@pytest.mark.parametrize(("level", "chatter_shown"), [(logging.WARNING, False), (logging.INFO, False), (logging.DEBUG, True)])
def test_library_info_lines_need_debug_and_their_warnings_always_show(
    level: int, chatter_shown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("botocore.credentials", "botocore")}
    try:
        setup("text", level)
        logging.getLogger("botocore.credentials").info("Found credentials in shared credentials file: ~/.aws/credentials")
        logging.getLogger("botocore").warning("a retry budget ran out")
        logging.getLogger("snapsync").info("took a snapshot")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, lvl in saved[2].items():
            logging.getLogger(name).setLevel(lvl)
    assert ("Found credentials" in err) == chatter_shown
    assert "a retry budget ran out" in err
    assert ("took a snapshot" in err) == (level <= logging.INFO)
