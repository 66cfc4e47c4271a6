"""Config loading: typed validation, one-line errors naming the key, CLI overrides, round trip."""

from pathlib import Path

import pytest
import yaml

from transfer.config import TeacherConfig, dump_config, load_config, parse_overrides
from transfer.errors import CKTFError

BASE = {
    "data": {"name": "fashion_split", "train_split": "source_train"},
    "model": {"name": "resnet8"},
    "train": {"epochs": 2, "batch_size": 32},
    "log": {"name": "t"},
}


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def error_of(fn) -> str:
    with pytest.raises(CKTFError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_loads_typed_values_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE), TeacherConfig)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == [150, 180, 210]
    assert cfg.data.root is None and cfg.log.root == "runs"


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, BASE), TeacherConfig, [
        "--train.epochs", "240", "--data.root", "/data/x", "--train.lr=0.1", "--train.milestones", "[3, 4]",
        "--data.options.labels_per_class", "20", "--log.name", "123", "--train.nesterov", "false"])
    assert cfg.train.epochs == 240
    assert cfg.data.root == "/data/x"
    assert cfg.train.lr == pytest.approx(0.1)
    assert cfg.train.milestones == [3, 4]
    assert cfg.data.options == {"labels_per_class": 20}
    assert cfg.log.name == "123"
    assert cfg.train.nesterov is False


def test_override_to_null(tmp_path):
    values = {**BASE, "data": {**BASE["data"], "root": "/x"}}
    cfg = load_config(write(tmp_path, values), TeacherConfig, ["--data.root", "null"])
    assert cfg.data.root is None


def test_unknown_key_in_file_suggests_the_right_one(tmp_path):
    values = {**BASE, "train": {"epoch": 3}}
    msg = error_of(lambda: load_config(write(tmp_path, values), TeacherConfig))
    assert "train.epoch" in msg and "train.epochs" not in msg.split("did you mean")[0]
    assert "epochs" in msg and "c.yaml" in msg


def test_unknown_key_on_command_line(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.epohcs", "3"]))
    assert "train.epohcs" in msg and "command line" in msg and "epochs" in msg


def test_unknown_section(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, {**BASE, "trian": {}}), TeacherConfig))
    assert "'trian'" in msg and "train" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.epochs", "many"]))
    assert "train.epochs" in msg and "integer" in msg and "many" in msg


def test_bool_is_not_an_integer_and_strings_are_not_bools(tmp_path):
    error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.epochs", "true"]))
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.nesterov", "yes please"]))
    assert "train.nesterov" in msg


def test_out_of_range(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--data.val_fraction", "0.9"]))
    assert "data.val_fraction" in msg and "0.9" in msg
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.milestones", "[0]"]))
    assert "train.milestones" in msg


def test_choice_fields(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.schedule", "linear"]))
    assert "train.schedule" in msg and "cosine" in msg
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--train.device", "tpu"]))
    assert "train.device" in msg


def test_required_key_missing(tmp_path):
    values = {k: v for k, v in BASE.items() if k != "model"}
    msg = error_of(lambda: load_config(write(tmp_path, values), TeacherConfig))
    assert "model.name" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    msg = error_of(lambda: load_config(tmp_path / "nope.yaml", TeacherConfig))
    assert "nope.yaml" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    msg = error_of(lambda: load_config(bad, TeacherConfig))
    assert "bad.yaml" in msg and "YAML" in msg


def test_bad_override_syntax():
    assert parse_overrides(["--a.b", "1", "--c.d=2"]) == [("a.b", "1"), ("c.d", "2")]
    error_of(lambda: parse_overrides(["train.epochs", "3"]))
    error_of(lambda: parse_overrides(["--train.epochs"]))
    error_of(lambda: parse_overrides(["--epochs", "3"]))


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), TeacherConfig, ["--data.options.source_classes", "[1, 5]"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again, TeacherConfig) == cfg


def test_shipped_configs_validate():
    root = Path(__file__).resolve().parents[1] / "configs"
    teacher_files = sorted(root.glob("*/teacher*.yaml"))
    assert teacher_files, "no teacher configs shipped"
    for path in teacher_files:
        load_config(path, TeacherConfig)


def test_overrides_for_keeps_only_the_schemas_sections():
    from transfer.config import TransferConfig
    from transfer.config.loader import overrides_for

    args = ["--model.name", "resnet8", "--sampler.num_negatives", "32", "--train.epochs=1"]
    assert overrides_for(TeacherConfig, args) == ["--model.name", "resnet8", "--train.epochs", "1"]
    assert overrides_for(TransferConfig, args) == ["--sampler.num_negatives", "32", "--train.epochs", "1"]


def test_error_for_a_command_line_section_names_the_command_line(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, BASE), TeacherConfig, ["--sampler.k", "3"]))
    assert "'sampler'" in msg and "command line" in msg and "c.yaml" not in msg


@pytest.mark.parametrize("kind,shared", [("uniform", True), ("debiased", False), ("hard", False)])
def test_sampler_shared_defaults_to_shared_for_uniform_only(tmp_path, kind, shared):
    from transfer.config import TransferConfig

    crd = Path(__file__).resolve().parents[1] / "configs" / "fashion_split" / "crd.yaml"
    cfg = load_config(crd, TransferConfig, ["--sampler.shared", "null", "--sampler.kind", kind])
    assert cfg.sampler.shared is shared
    assert yaml.safe_load(dump_config(cfg))["sampler"]["shared"] is shared  # the saved config says which


def test_base_chain_merges_mappings_and_replaces_leaves(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(yaml.safe_dump({**BASE, "data": {**BASE["data"], "options": {"a": 1}}}))
    (tmp_path / "sub/mid.yaml").write_text("base: ../root.yaml\ntrain: {epochs: 5, milestones: [1, 2]}\n")
    (tmp_path / "sub/leaf.yaml").write_text("base: mid.yaml\ndata: {options: {b: 2}}\nlog: {name: leaf}\n")
    cfg = load_config(tmp_path / "sub/leaf.yaml", TeacherConfig, ["--train.batch_size", "8"])
    assert (cfg.train.epochs, cfg.train.milestones, cfg.train.batch_size) == (5, [1, 2], 8)
    assert cfg.data.options == {"a": 1, "b": 2} and cfg.data.train_split == "source_train"
    assert cfg.log.name == "leaf" and cfg.model.name == "resnet8"
    assert "base" not in yaml.safe_load(dump_config(cfg))  # the saved config is the resolved one


def test_an_error_names_the_file_the_key_came_from(tmp_path):
    (tmp_path / "root.yaml").write_text(yaml.safe_dump({**BASE, "train": {"epochs": -1}}))
    (tmp_path / "leaf.yaml").write_text("base: root.yaml\ntrain: {batch_size: 0}\n")
    msg = error_of(lambda: load_config(tmp_path / "leaf.yaml", TeacherConfig, ["--train.batch_size", "4"]))
    assert "'train.epochs'" in msg and "root.yaml" in msg
    (tmp_path / "root.yaml").write_text(yaml.safe_dump(BASE))
    msg = error_of(lambda: load_config(tmp_path / "leaf.yaml", TeacherConfig))
    assert "'train.batch_size'" in msg and "leaf.yaml" in msg


@pytest.mark.parametrize("base,expected", [
    ("missing.yaml", "missing.yaml does not exist ('base:' of"),
    ("[1, 2]", "config key 'base' in"),
    ("null", "config key 'base' in"),
    ("leaf.yaml", "comes back to itself"),
])
def test_bad_base_is_one_line(tmp_path, base, expected):
    (tmp_path / "leaf.yaml").write_text(f"base: {base}\nlog: {{name: x}}\n")
    assert expected in error_of(lambda: load_config(tmp_path / "leaf.yaml", TeacherConfig))


def test_a_two_file_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    msg = error_of(lambda: load_config(tmp_path / "a.yaml", TeacherConfig))
    assert "comes back to itself" in msg and "a.yaml -> " in msg


def test_a_list_of_bases_merges_in_order(tmp_path):
    (tmp_path / "root.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "a.yaml").write_text("base: root.yaml\ntrain: {epochs: 3, lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 7}\ndata: {options: {x: 1}}\n")
    (tmp_path / "ab.yaml").write_text("base: [a.yaml, b.yaml]\nlog: {name: ab}\n")
    cfg = load_config(tmp_path / "ab.yaml", TeacherConfig)
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.options, cfg.log.name) == (7, 0.1, {"x": 1}, "ab")


NON_NAME_KEYS = [("?", "'?' with no name after it"), ("? [a, b]: 1", "'[a, b]: 1'"), ("1: 2", "'1'"),
                 ("null: 1", "'null'"), ("true: 1", "'true'"), ("~: 1", "'~'"), ("1.5: x", "'1.5'"),
                 ("2020-01-01: 1", "'2020-01-01'"), ("[a]: 1", "'[a]'"),
                 ("train:\n  ? [a]\n  : 1\n", "'[a]' at line 2 under 'train'"),
                 ("loss:\n  terms:\n    kd: {1: 2}\n", "'1' at line 3 under 'loss.terms.kd'"),
                 ("data:\n  options:\n    - {null: 1}\n", "'null' at line 3 under 'data.options'")]


@pytest.mark.parametrize("text,shown", NON_NAME_KEYS)
@pytest.mark.parametrize("via_base", [False, True])
def test_a_key_that_is_not_a_name_is_one_line_naming_it(tmp_path, text, shown, via_base):
    (tmp_path / "bad.yaml").write_text(text)
    path = tmp_path / "bad.yaml"
    if via_base:
        path = tmp_path / "leaf.yaml"
        path.write_text("base: bad.yaml\nlog: {name: x}\n")
    msg = error_of(lambda: load_config(path, TeacherConfig))
    assert "bad.yaml" in msg and f"key {shown}" in msg and "is not a name" in msg


def test_a_quoted_key_is_a_name(tmp_path):
    (tmp_path / "c.yaml").write_text("'1': 2\n")
    assert "unknown config key '1'" in error_of(lambda: load_config(tmp_path / "c.yaml", TeacherConfig))
    cfg = load_config(write(tmp_path, BASE), TeacherConfig, ["--data.options", "{'1': 2}"])
    assert cfg.data.options == {"1": 2}


@pytest.mark.parametrize("value,shown", [("{1: 2}", "'1'"), ("{null: 1}", "'null'"), ("[{true: 1}]", "'true'"),
                                         ("{a: {2: 3}}", "'2'")])
def test_a_command_line_value_with_a_key_that_is_not_a_name(value, shown):
    msg = error_of(lambda: load_config(None, TeacherConfig, ["--data.options", value]))
    assert "--data.options on the command line" in msg and f"key {shown}" in msg


def test_resume_with_a_saved_config_whose_keys_are_not_names_is_one_line(tmp_path):
    from transfer.engine.rundir import RunDir
    from transfer.stages.common import write_run_config

    cfg = load_config(write(tmp_path, BASE), TeacherConfig)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("train: {epochs: 2}\n? [x]\n")
    msg = error_of(lambda: write_run_config(run, cfg, resume=True))
    assert str(run.config) in msg and "key '[x]'" in msg


def test_an_error_quoting_a_line_break_stays_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text('"tra\\nin": {epochs: 1}\n')
    msg = error_of(lambda: load_config(tmp_path / "c.yaml", TeacherConfig))
    assert "unknown config key 'tra\\nin'" in msg


def test_num_workers_auto_is_resolved_from_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    from transfer.config import schema

    for cpus, expected in ((1, 0), (2, 1), (3, 2), (64, 4)):
        monkeypatch.setattr(schema, "available_cpus", lambda cpus=cpus: cpus)
        cfg = load_config(write(tmp_path, BASE), TeacherConfig, ["--data.num_workers", "auto"])
        assert cfg.data.num_workers == expected
        assert yaml.safe_load(dump_config(cfg))["data"]["num_workers"] == expected  # the value used is recorded


def test_more_workers_than_cpus_is_one_line_of_cktf_not_torchs_warning_per_loader(caplog, recwarn):
    import logging

    import torch
    from torch.utils.data import TensorDataset

    from transfer.config.schema import available_cpus
    from transfer.stages import common

    many = available_cpus() + 3
    data = TensorDataset(torch.zeros(8, 1))
    with caplog.at_level(logging.WARNING, logger="cktf"):
        for train in (True, False):
            loader = common.make_loader(data, 4, train=train, num_workers=many, device=torch.device("cpu"))
            iter(loader)._shutdown_workers()
    ours = [r.getMessage() for r in caplog.records if f"data.num_workers {many}" in r.getMessage()]
    assert len(ours) == 1 and "--data.num_workers auto" in ours[0]
    assert not [w for w in recwarn if "worker processes in total" in str(w.message)]
