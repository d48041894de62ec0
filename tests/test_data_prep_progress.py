"""The data commands' progress: plain lines with an ETA in logs (no ``\\r``), tqdm on a terminal."""

from __future__ import annotations

import io
import sys

from lmfab.data.prep import progress as P


def test_log_lines_have_no_carriage_return_and_show_eta(monkeypatch, capsys):
    monkeypatch.setattr(P, "LOG_EVERY", 0.0)  # a line per tick
    log = P.Progress("pack", True)
    log.start("encode", total=4)
    log.tick(2_000_000, 10, files=1)
    log.tick(2_000_000, 10, files=1)
    log.done()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("[pack] encode 1/4 files, ETA 0:0") and "10 docs" in lines[0]
    assert lines[-1].startswith("[pack] encode done 2/4 files, 20 docs, 4.0 MB in ")
    assert "docs/s" in lines[-1] and "MB/s" in lines[-1]


def test_task_counter_and_disabled(capsys):
    bar = P.Progress("curate", True, docs=False)
    bar.start("write: gather shards", 3, unit="tasks")
    for _ in range(3):
        bar.tick(files=1)
    bar.done()
    P.Progress("quiet", False).done()
    err = capsys.readouterr().err
    assert err.startswith("[curate] write: gather shards done 3/3 tasks, ") and "docs" not in err
    assert err.count("\n") == 1


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    log = P.Progress("tokenizer", True)
    log.start("encode", total=2)
    log.tick(100, 1, files=1)
    assert log.bar is not None
    log.done()
    out = fake.getvalue()
    assert "[tokenizer] encode" in out and "\r" in out  # redrawn in place
    assert out.rstrip().splitlines()[-1].startswith("[tokenizer] encode done 1/2 files")
