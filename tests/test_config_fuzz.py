"""Property-based fuzzing of the config loader and the command line: whatever bytes, YAML values, keys or
values a user supplies, cktf answers with a config or one line — never a traceback.

How many examples run and whether they are random comes from the hypothesis profile (tests/conftest.py):
under CI (``CI=true``) the same examples every run; ``make fuzz`` runs thousands of random ones. Every example
that ever failed is pinned below with ``@example``.
"""

import os
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.cli_helpers import invoke
from transfer.config import TeacherConfig, TransferConfig, describe_options, load_config
from transfer.errors import CKTFError

REPO = Path(__file__).resolve().parents[1]
TEACHER_CFG = REPO / "configs/fashion_split/teacher.yaml"
KEYS = [key[2:] for key, _, _ in describe_options(TransferConfig)]
FUZZ = settings(settings.default)
# a command line runs the whole CLI: fewer examples than the loader tests, in the same proportion under `make fuzz`
CLI_FUZZ = settings(settings.default, max_examples=max(20, settings.default.max_examples * 2 // 5))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
# keys YAML reads as something else than a name (null, numbers, booleans) as well as names
mapping_keys = st.one_of(st.text(max_size=8), st.none(), st.integers(-3, 3), st.booleans(), st.floats(0, 2))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(mapping_keys, inner,
                                                                                          max_size=4),
                      max_leaves=12)
key_parts = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "._-", min_size=1, max_size=15))


def nested(flat: dict) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else node
        node[leaf] = value
    return tree


def load(text: bytes, schema: type, overrides: list[str] = ()):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(text)
        try:
            return load_config(path, schema, overrides)
        except CKTFError as err:
            assert "\n" not in str(err) and str(err), repr(str(err))
            return None


@FUZZ
@given(st.binary(max_size=400))
@example(b"?")  # a YAML complex-key marker: the key None crashed the did-you-mean (issue 17)
@example(b"? [a, b]: 1")
@example(b"1: 2")
@example(b"null: 1")
@example(b"true: 1")
@example(b"train: {? x}")
@example(b"train:\n  ? [a]\n  : 1\n")
@example(b"a: &x [*x]")
def test_arbitrary_bytes_as_a_config_file(data):
    load(data, TransferConfig)


@FUZZ
@given(st.dictionaries(key_parts, values, max_size=8))
@example({"data.name": {"\n": {None: None}}})  # a line break inside a key's path (found by make fuzz)
@example({"loss.terms": {"k\nd": 1}})
@example({"train": {"?": {1: 2}}, "loss": {"terms": {"kd": {None: 1}}}})
def test_yaml_values_of_every_type_under_any_key(flat):
    text = yaml.safe_dump(nested(flat), allow_unicode=True, sort_keys=False).encode()
    load(text, TransferConfig)
    base = yaml.safe_load(TEACHER_CFG.read_text())
    merged = {**base, **nested(flat)}
    load(yaml.safe_dump(merged, allow_unicode=True, sort_keys=False).encode(), TeacherConfig)


safe_keys = st.sampled_from([k for k in KEYS if k not in ("data.root", "train.threads", "train.compile")])
cli_keys = st.one_of(safe_keys, st.text(string.printable.strip(), min_size=1, max_size=12))
cli_values = st.one_of(st.text(max_size=12), st.sampled_from(["null", "[1, 2", "{a: 1}", "-1", "1e-3", "nan",
                                                              "true", "", "--x", "0"]))


@CLI_FUZZ
@given(st.lists(st.tuples(cli_keys, cli_values), max_size=5), st.booleans())
def test_command_line_overrides(pairs, with_equals):
    args = []
    for key, value in pairs:
        args += [f"--{key}={value}"] if with_equals else [f"--{key}", value]
    with tempfile.TemporaryDirectory() as tmp:
        code, out = invoke("train-teacher", "--config", str(TEACHER_CFG), *args, "--log.root", tmp,
                           "--data.root", str(Path(tmp) / "no_data_here"))
    lines = [line for line in out.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), (args, out)


def test_the_ci_profile_draws_the_same_examples_on_every_run():
    """CI's verdict on a commit cannot depend on luck: the ``ci`` profile draws identical examples each run."""

    def draw() -> list:
        seen = []

        @settings(settings.get_profile("ci"), max_examples=25)
        @given(st.binary(max_size=400), st.dictionaries(key_parts, values, max_size=3))
        def collect(data, flat):
            seen.append((data, repr(flat)))

        collect()
        return seen

    first = draw()
    assert len(first) == 25 and first == draw()


def test_ci_selects_the_derandomized_profile():
    from tests.conftest import hypothesis_profile

    assert hypothesis_profile({"CI": "true"}) == "ci" and hypothesis_profile({}) == "dev"
    assert hypothesis_profile({"CI": "true", "CKTF_HYPOTHESIS_PROFILE": "fuzz"}) == "fuzz"
    if hypothesis_profile(dict(os.environ)) == "ci":
        assert settings.default.derandomize and settings.default.database is None
