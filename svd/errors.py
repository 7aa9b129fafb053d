"""Errors as one line: every failure a user sees names the bad thing in one line (a config key, a file, a
row), so messages built from library errors flatten them first."""

from __future__ import annotations

import re


def one_line(error: BaseException) -> str:
    """An error's text as one line; Lance's run over several lines and end in a Rust source location."""
    text = " ".join(str(error).split()) or type(error).__name__
    return re.sub(r", /\S+\.rs:\d+:\d+", "", text)


def described(error: BaseException) -> str:
    """The error's type and text, in one line: how a message quotes an error from another library."""
    return f"{type(error).__name__}: {one_line(error)}"
