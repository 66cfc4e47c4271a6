"""Every error line the Troubleshooting page explains is one cktf can print (issue 24): each `Error: …` quoted in
the page's tables, read with `…` as "any text", must match a message raised in transfer/ or linear_probe/, so a
reworded message cannot leave a stale explanation behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "troubleshooting.md"
CLICK_MESSAGES = {"Missing option '--config'."}  # click's own wording, not cktf's
SPAN = re.compile(r"`([^`]+)`")
ADJACENT_LITERALS = re.compile(r'"[ \t]*\n[ \t]*[rRfF]{0,2}"|"[ \t]+[rRfF]{0,2}"')
PLACEHOLDER = re.compile(r"\{[^{}]*\}")
CONSTANT = re.compile(r'^([A-Z][A-Z0-9_]*) = "([^"\n]*)"$', re.M)


def documented_messages(text: str) -> list[str]:
    """The code spans in the first cell of every table row whose first span starts with ``Error:``."""
    messages = []
    for line in text.splitlines():
        if not line.startswith("| `Error:"):
            continue
        first_cell = line.split(" | ")[0]
        messages += [span.removeprefix("Error: ") for span in SPAN.findall(first_cell)]
    return messages


def raised_text() -> str:
    """The source of transfer/ and linear_probe/ with adjacent string literals joined, a module's string
    constants filled in (``{KEY}`` → ``loss.terms.fitnet``), other f-string fields shown as ``…`` (``'…'`` for
    ``!r``) and backticks dropped, as the messages read on a terminal."""
    parts = []
    for path in sorted([*REPO.glob("transfer/**/*.py"), *REPO.glob("linear_probe/**/*.py")]):
        source = ADJACENT_LITERALS.sub("", path.read_text())
        for name, value in CONSTANT.findall(source):
            source = source.replace("{" + name + "}", value)
        source = re.sub(r"\{[^{}]*!r\}", "'…'", source)
        parts.append(PLACEHOLDER.sub("…", source).replace("`", ""))
    return "\n".join(parts)


def unmatched_fragment(message: str, source: str) -> str | None:
    """The first piece of ``message`` (split at ``…``) that no raised message contains, else None."""
    for fragment in message.split("…"):
        fragment = fragment.strip()
        if len(fragment) >= 4 and fragment not in source:
            return fragment
    return None


MESSAGES = documented_messages(PAGE.read_text())


def test_the_page_explains_many_errors():
    assert len(MESSAGES) >= 80, len(MESSAGES)


@pytest.mark.parametrize("message", [m for m in MESSAGES if m not in CLICK_MESSAGES])
def test_each_explained_error_is_one_cktf_raises(message):
    missing = unmatched_fragment(message, SOURCE)
    assert missing is None, f"docs/troubleshooting.md quotes {message!r}, but no message in the code contains " \
                            f"{missing!r}; quote the message as the code words it"


def test_a_reworded_message_is_caught():
    assert unmatched_fragment("run directory … already exists; pass --resume to continue it", SOURCE) is None
    assert unmatched_fragment("run directory … already exists; pass --continue to go on", SOURCE) is not None


SOURCE = raised_text()
