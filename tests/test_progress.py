"""`vaebuild.progress.progress_log`: a live line with elapsed time on a terminal, plain lines elsewhere."""

import io
import time

from vaebuild.progress import progress_log


def test_plain_lines_when_not_a_terminal():
    stream, lines = io.StringIO(), []
    with progress_log(lines.append, stream=stream) as log:  # StringIO.isatty() is False, as in CI logs
        log("tracing ...")
        log("done")
    assert lines == ["tracing ...", "done"]
    assert stream.getvalue() == ""


def test_live_line_with_elapsed_time_on_a_terminal():
    stream, echoed = io.StringIO(), []
    with progress_log(echoed.append, stream=stream, live=True) as log:
        log("tracing ...")
        time.sleep(0.3)  # the live line refreshes several times a second
        log("done")
    text = stream.getvalue()
    assert echoed == []  # on a terminal the lines go to the stream, above the live line
    assert "tracing ...\n" in text and "done\n" in text and text.index("tracing ...") < text.index("done\n")
    assert "0:00:00" in text  # the elapsed-time column
    assert "\x1b[" in text  # terminal control sequences redraw the live line


def test_terminal_is_detected_from_the_stream():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream, echoed = Terminal(), []
    with progress_log(echoed.append, stream=stream) as log:
        log("building ...")
    assert echoed == [] and "building ..." in stream.getvalue()
