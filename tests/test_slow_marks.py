"""A test marked ``slow`` says why it needs its time: tests/conftest.py refuses a bare mark when it collects."""

import pytest

from tests.conftest import unexplained_slow_marks


class Item:
    def __init__(self, nodeid: str, *marks: pytest.MarkDecorator) -> None:
        self.nodeid, self.marks = nodeid, [m.mark for m in marks]

    def iter_markers(self, name: str):
        return [m for m in self.marks if m.name == name]


def test_a_slow_mark_needs_its_reason():
    items = [Item("ok", pytest.mark.slow(reason="two torchrun launches")), Item("bare", pytest.mark.slow),
             Item("blank", pytest.mark.slow(reason=" ")), Item("positional", pytest.mark.slow("two launches")),
             Item("misspelt", pytest.mark.slow(resaon="two launches")),
             Item("other", pytest.mark.skipif(False, reason=""))]
    assert unexplained_slow_marks(items) == ["bare", "blank", "positional", "misspelt"]


def test_the_suites_slow_marks_all_say_why(request):
    assert not unexplained_slow_marks(request.session.items)
