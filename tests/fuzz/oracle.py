"""The oracle every fuzz target shares: accepted, or one message naming the input."""

from __future__ import annotations

import contextlib
import io

from lmfab.cli import main


def run_cli(argv: list[str], *names: str) -> tuple[int, str, str]:
    """``lmfab ARGV`` in-process. It must return 0, or 2 with one ``lmfab: error:`` line that
    names one of ``names`` (the file, key or tensor given); any exception is a defect."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors and handlers' messages
            code = e.code if isinstance(e.code, int) else 2
            if not isinstance(e.code, int | None):
                print(f"lmfab: error: {e.code}", file=err)
    text = err.getvalue()
    assert code in (0, 2), (code, text[-2000:])
    assert "Traceback" not in text, text[-2000:]
    if code == 2:
        errors = [ln for ln in text.splitlines() if ln.startswith("lmfab: error: ")]
        assert errors, text[-2000:]
        assert any(n in errors[0] for n in names), (names, errors[0])
    return code, out.getvalue(), text


def assert_names(err: BaseException, *names: str) -> None:
    """A library-level refusal: its message names the input."""
    msg = str(err)
    assert any(n in msg for n in names), (names, msg)
