"""Two ranks on 127.0.0.1 (gloo, CPU) through the real command line under torchrun.

Each rank dumps its task state at the end (``tests/rank_driver.py``), so the tests compare ranks with each
other, with one process, and interrupted-then-resumed runs with uninterrupted ones. Every launch has a
subprocess timeout and ``CKTF_DIST_TIMEOUT``, so a hung collective fails the test instead of blocking CI.
A launch costs ~10 s of CPU before cktf starts (three torch imports), so commands that refuse before training or
run to completion under the same instrumentation share one launch (:func:`launch_sequence`); interrupted runs and
their resumes always get fresh processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx
from tests.devices import REPORT_CUDA_ENV
from transfer.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/fashion_split"
LAUNCH_TIMEOUT = 150
pytestmark = pytest.mark.slow(reason="torchrun launches: ~10 s of CPU each (torchrun's agent and two ranks import "
                                     "torch) before the ranks train, resume or refuse")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], *, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m tests.rank_driver ARGS`` (a plain process for ``nproc=0``).

    The ranks run on the CPU (gloo) with torch reporting a CUDA device, as they would on a GPU machine: a
    test's run that touched CUDA would fail here (tests/rank_driver.py).
    """
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CKTF_DIST_TIMEOUT": "60",
                REPORT_CUDA_ENV: "1", **env}
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
              "127.0.0.1", "--master_port", str(free_port()), "-m", "tests.rank_driver"] if nproc else \
        [sys.executable, "-m", "tests.rank_driver"]
    return subprocess.run([*runner, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)


def launch_sequence(spec: Path, commands: list[dict], *, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """One :func:`launch` running ``commands`` in turn (tests/rank_driver.py, CKTF_TEST_SEQUENCE; the list is written
    to ``spec``): what separate launches of commands that refuse before training, or run to completion, would show,
    at one launch's cost. Each command's output and exit code are read back with :func:`command_result`."""
    spec.write_text(json.dumps([{**command, "master_port": free_port()} for command in commands]))
    return launch([], nproc=nproc, CKTF_TEST_SEQUENCE=str(spec), **env)


def command_result(done: subprocess.CompletedProcess, out: Path, ranks: tuple[int, ...] = (0, 1)
                   ) -> subprocess.CompletedProcess:
    """One command of a :func:`launch_sequence`, as if launched alone: its ranks' output, and the first nonzero
    exit code of its ranks (0 if all succeeded). A command the launch never finished fails with its output."""
    if not all((out / f"rank{rank}.code").is_file() for rank in ranks):
        found = {p.name: p.read_text()[-2000:] for p in sorted(out.glob("rank*.err"))}
        pytest.fail(f"the launch did not finish this command: {found}\n{done.stderr[-3000:]}")
    codes = [int((out / f"rank{rank}.code").read_text()) for rank in ranks]
    text = {kind: "".join((out / f"rank{rank}.{kind}").read_text() for rank in ranks) for kind in ("out", "err")}
    return subprocess.CompletedProcess(done.args, next((c for c in codes if c), 0), text["out"], text["err"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_fashion_idx(root / "fashion", n_train=400, n_test=60)  # 200 unlabeled target items
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root", str(root / "fashion"),
                       "--log.root", str(root / "runs"), "--log.name", "teacher", "--model.name", "resnet8",
                       "--train.epochs", "0", "--log.tensorboard", "false")
    assert code == 0, out
    return root


def transfer_args(data: Path, runs: Path, config: str = "cktf", *extra: str) -> list[str]:
    return ["transfer", "--config", str(CONFIGS / f"{config}.yaml"), "--data.root", str(data / "fashion"),
            "--log.root", str(runs), "--log.name", "run", "--teacher", str(data / "runs/teacher/best.safetensors"),
            "--train.batch_size", "16", "--train.threads", "1", "--sampler.num_negatives", "64", *extra]


def dumped(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = load_checkpoint(folder / f"rank{rank}.safetensors").state
    return state["task"], [{k: v for k, v in row.items() if not k.endswith("per_s")} for row in state["history"]]


def final_state(run: Path) -> tuple[dict, list]:
    state = load_checkpoint(run / "last.safetensors").state
    return state["task"], [{k: v for k, v in row.items() if not k.endswith("per_s")} for row in state["history"]]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def check_identical_ranks(done: subprocess.CompletedProcess, dump: Path, run: Path, banks: int,
                          bank_dtype: torch.dtype = torch.float32) -> None:
    """Banks, Z, heads, student weights and BatchNorm statistics bit-identical on both ranks; one start line and
    one closing line; the run directory holds one set of files, written by rank 0."""
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("2 processes (gloo) x batch 8 per rank = global batch 16") == 1, done.stderr
    assert done.stdout.count("done: ") == 1
    rank0, history0 = dumped(dump, 0)
    rank1, history1 = dumped(dump, 1)
    assert_same(rank0, rank1)
    assert history0 == history1
    bank_keys = [k for k in rank0 if "bank_" in k]
    assert len(bank_keys) == banks and all(rank0[k].dtype == bank_dtype for k in bank_keys)
    assert all(torch.isfinite(rank0[k]).all() for k in rank0 if k.endswith(("z_student", "z_teacher")))
    saved, _ = final_state(run)
    assert_same(saved, rank0)
    files = sorted(p.name for p in run.iterdir())
    events = [name for name in files if name.startswith("events.out.tfevents")]
    assert len(events) == 1, files
    assert sorted(set(files) - set(events)) == [".cktf-run", "config.yaml", "last.safetensors", "metrics.json"]


# CRD with shared negatives is CKTF's shared run (test_cktf_shared_ranks_stay_identical) without the stage terms
IDENTICAL = {
    "kd": ("kd", (), 0),
    "cktf-per-anchor-fp16-banks": ("cktf", ("--sampler.shared", "false", "--loss.nce.bank_dtype", "fp16"), 10),
}


def interrupt_args(data: Path, runs: Path) -> list[str]:
    return [*transfer_args(data, runs, "cktf", "--train.checkpoint_every", "3"), "--train.epochs", "2"]


@pytest.fixture(scope="module")
def complete_runs(data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One launch for the runs that complete: first (in fresh processes, as the interrupted runs resume) the
    uninterrupted 2-epoch CKTF run in ``straight``, then one epoch of each IDENTICAL case; every rank's final
    state dumped."""
    root = tmp_path_factory.mktemp("complete")
    commands = [{"args": interrupt_args(data, root / "straight"), "out": str(root / "straight"), "dump": True}]
    commands += [{"args": [*transfer_args(data, root / case / "runs", config, *extra), "--train.epochs", "1"],
                  "out": str(root / case), "dump": True} for case, (config, extra, _) in IDENTICAL.items()]
    return launch_sequence(root / "sequence.json", commands), root


@pytest.mark.parametrize("case", IDENTICAL)
def test_ranks_stay_identical(complete_runs, case):
    done, root = complete_runs
    _, extra, banks = IDENTICAL[case]
    check_identical_ranks(command_result(done, root / case), root / case, root / case / "runs/run", banks,
                          torch.float16 if "fp16" in extra else torch.float32)


def pretraining_args(data: Path, runs: Path, tmp_path: Path) -> list[str]:
    """FT's paraphraser and FitNet's hint stage pre-trained for one epoch each, then no main loop (epochs 0: the
    saved state is what the init phases left, before DDP would broadcast rank 0's weights)."""
    cfg = yaml.safe_load((CONFIGS / "kd.yaml").read_text())
    cfg["loss"] = {"method": "ft_fitnet", "terms": {"ft": {"weight": 1.0, "init_epochs": 1},
                                                    "fitnet": {"weight": 1.0, "init_epochs": 1}}}
    config = tmp_path / "ft_fitnet.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = transfer_args(data, runs, "kd", "--log.tensorboard", "false", "--train.epochs", "0")
    args[args.index("--config") + 1] = str(config)
    return args


@pytest.fixture(scope="module")
def comparable(data, tmp_path_factory) -> tuple[dict[str, subprocess.CompletedProcess], Path]:
    """Two runs made comparable (tests/rank_driver.py, CKTF_TEST_COMPARABLE), each on 2 ranks (one launch for both)
    and in one process with the global batch (one launch): ``global_batch``, CKTF + KD with per-anchor negatives
    for one epoch, and ``init_phases`` (:func:`pretraining_args`). Each rank's final state is dumped into
    ``<case>/two`` or ``<case>/one``."""
    root = tmp_path_factory.mktemp("comparable")
    cases = {
        "global_batch": [*transfer_args(data, root / "runs", "cktf", "--sampler.shared", "false",
                                        "--loss.terms.kd.weight", "0.5", "--loss.nce.projection", "linear",
                                        "--train.lr", "0.005", "--train.channels_last", "false",
                                        "--log.tensorboard", "false"), "--train.epochs", "1"],
        "init_phases": pretraining_args(data, root / "runs", root),
    }
    launches = {}
    for world, nproc in (("two", 2), ("one", 0)):
        commands = [{"args": [*args, "--log.name", f"{case}_{world}"], "out": str(root / case / world), "dump": True}
                    for case, args in cases.items()]
        launches[world] = launch_sequence(root / f"{world}.json", commands, nproc=nproc, CKTF_TEST_COMPARABLE="1")
    return launches, root


def test_two_ranks_equal_one_process_with_the_global_batch(comparable):
    """2 ranks x batch 8 against 1 process x batch 16, CKTF + KD with per-anchor negatives.

    Made comparable (tests/rank_driver.py, CKTF_TEST_COMPARABLE): a student without BatchNorm (a rank's
    BatchNorm sees only its 8 samples; SyncBatchNorm would fix that but needs CUDA), no random augmentation,
    and negatives keyed by the anchor (by design each rank draws its own). What remains is float rounding:
    the global batch's gradient is the mean of the two ranks' gradients, summed in a different order.
    """
    launches, root = comparable
    one = command_result(launches["one"], root / "global_batch/one", ranks=(0,))
    assert one.returncode == 0, one.stderr[-3000:]
    two = command_result(launches["two"], root / "global_batch/two")
    assert two.returncode == 0, two.stderr[-3000:]
    single, single_history = dumped(root / "global_batch/one", 0)
    ranked, ranked_history = dumped(root / "global_batch/two", 0)
    assert single.keys() == ranked.keys()
    for key in single:
        a, b = single[key].double(), ranked[key].double()
        scale = max(a.abs().max().item(), 1e-12) if a.numel() else 1.0
        assert (a - b).abs().max().item() <= 1e-4 * scale, key
    for row_a, row_b in zip(single_history, ranked_history, strict=True):
        for key, value in row_a.items():
            assert row_b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def uninterrupted(complete_runs) -> tuple[subprocess.CompletedProcess, Path]:
    done, root = complete_runs
    return command_result(done, root / "straight"), root / "straight"


def test_cktf_shared_ranks_stay_identical(uninterrupted):
    done, runs = uninterrupted
    check_identical_ranks(done, runs, runs / "run", 10)


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_one_rank_interrupted_then_resumed_equals_uninterrupted(data, uninterrupted, tmp_path, signame):
    """A signal reaches rank 1 only, at its 17th batch load (epoch 2, batch 4 of 12: the end of epoch 1 counts
    one). SIGKILL takes the whole job down (torchrun stops rank 0); SIGTERM makes both ranks stop at the same step
    and rank 0 save. ``--resume`` under torchrun then ends with exactly the uninterrupted 2-rank run's weights,
    banks and history."""
    args = interrupt_args(data, tmp_path)
    stopped = launch(args, CKTF_TEST_SIGNAL=f"{signame}:17:1")
    assert stopped.returncode != 0
    if signame == "SIGTERM":
        line = [ln for ln in stopped.stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
        assert len(line) == 1 and "epoch 2, batch 4" in line[0], stopped.stderr[-3000:]
        assert "torchrun <the same options> -m transfer.cli transfer" in line[0] and line[0].endswith("--resume")
    saved = load_checkpoint(tmp_path / "run/last.safetensors").state
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert saved["progress"]["batches"] == (4 if signame == "SIGTERM" else 3)
    resumed = launch([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and resumed.stderr.count("resuming") == 1
    task, history = final_state(tmp_path / "run")
    done, runs = uninterrupted
    assert done.returncode == 0, done.stderr[-3000:]
    want_task, want_history = final_state(runs / "run")
    assert history == want_history
    assert_same(task, want_task)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def stopped_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def seen(folder: Path, mappings: bool = False) -> list[dict]:
    found = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return found if mappings else [{k: v for k, v in rank.items() if k != "mappings"} for rank in found]


def test_per_batch_mapping_picks_the_same_blocks_on_every_rank(data, tmp_path, strategy="smallest"):
    """CKTF with a resnet14 teacher (two blocks per stage) and per-batch largest/smallest: each rank measures its own
    sub-batch, but every rank must pair the same teacher blocks at every step. On these tiny untrained networks
    every sub-batch prefers the same block, so seeded noise that differs per rank (tests/rank_driver.py) stands in
    for sub-batches that disagree."""
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root",
                       str(data / "fashion"), "--log.root", str(tmp_path), "--log.name", "teacher14", "--model.name",
                       "resnet14", "--train.epochs", "0", "--log.tensorboard", "false")
    assert code == 0, out
    done = launch([*transfer_args(data, tmp_path / "runs", "cktf", "--log.tensorboard", "false"), "--train.epochs",
                   "1", "--teacher", str(tmp_path / "teacher14/best.safetensors"), "--loss.terms.mckt.layer_mapping",
                   strategy, "--loss.terms.mckt.mapping_schedule", "per_batch"], CKTF_TEST_SEEN=str(tmp_path / "seen"),
                  CKTF_TEST_SIMILARITY_NOISE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = seen(tmp_path / "seen", mappings=True)
    assert len(rank0["mappings"]) == 12 and rank0["mappings"] == rank1["mappings"]
    assert len({tuple(m) for m in rank0["mappings"]}) > 1  # the choice moves, so agreeing is not trivial


def test_a_doubled_sigterm_and_a_slow_checkpoint_still_save_before_any_rank_leaves(data, tmp_path):
    """Two SIGTERMs reach rank 1 at once at its 5th batch (a scheduler's and torchrun's), and rank 0 takes 3 s to
    write every checkpoint (network storage). The second signal falls within the repeat window and is ignored;
    both ranks stop at step 5, and each finds that checkpoint on disk when its command ends: no rank leaves
    while rank 0 is still writing (torchrun would then kill rank 0 mid-write)."""
    stopped = launch([*transfer_args(data, tmp_path, "kd", "--log.tensorboard", "false"), "--train.epochs", "1"],
                     CKTF_TEST_SIGNAL="SIGTERM:5:1:2", CKTF_TEST_SAVE_DELAY="3",
                     CKTF_TEST_SEEN=str(tmp_path / "seen"))
    assert "epoch 1, batch 5" in stopped_line(stopped)
    assert seen(tmp_path / "seen") == [{"code": 143, "step": 5, "saved_step": 5}] * 2
    assert load_checkpoint(tmp_path / "run/last.safetensors").state["progress"]["batches"] == 5


def test_init_phases_train_every_rank_as_one_process(comparable):
    """The init phases run before the main loop's DDP wrap: their steps must average gradients across ranks. Both
    ranks end identical (weights and BatchNorm statistics), and FT's paraphraser (no BatchNorm) equals one process
    with the global batch; without the sync each rank trained on its own half."""
    launches, root = comparable
    two = command_result(launches["two"], root / "init_phases/two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("loss.terms.ft pre-training: epoch 1/1") == 1
    rank0, _ = dumped(root / "init_phases/two", 0)
    rank1, _ = dumped(root / "init_phases/two", 1)
    assert_same(rank0, rank1)
    one = command_result(launches["one"], root / "init_phases/one", ranks=(0,))
    assert one.returncode == 0, one.stderr[-3000:]
    single, _ = dumped(root / "init_phases/one", 0)
    paraphraser = [key for key in single if ".paraphraser." in key]
    assert paraphraser
    for key in paraphraser:
        assert torch.allclose(single[key], rank0[key], rtol=1e-4, atol=1e-6), key


def test_a_diverging_init_phase_stops_every_rank_in_one_line(data, tmp_path):
    """Rank 1's pre-training loss turns NaN at its second step: every rank stops with the same line (printed once,
    by rank 0), instead of rank 1 alone while rank 0 trains on."""
    done = launch(pretraining_args(data, tmp_path, tmp_path), CKTF_TEST_NAN_MSE="1:2")
    line = one_error_line(done, ": the pre-training phase diverged at epoch 1", "init_lr")
    assert "(rank" not in line


def one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    # torchrun's agent prints a traceback of its own for any failed worker; none may come from cktf
    assert f"{REPO}/transfer/" not in done.stderr and f"{REPO}/linear_probe/" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


REFUSALS = {
    "batch": ("kd", ("--train.batch_size", "15"), {}, ("train.batch_size 15 is not divisible by the 2",)),
    "sync_bn-cpu": ("kd", ("--train.sync_bn", "true"), {}, ("train.sync_bn needs CUDA",)),
    "config-differs": ("kd", (), {"1": "--train.lr 0.1"}, ("ranks disagree on the resolved config",)),
    # rank 0 alone would build and broadcast a neighbour table: the config check must come before that collective
    "sampler-kind-differs": ("crd", ("--sampler.kind", "debiased", "--sampler.shared", "false", "--sampler.k", "2"),
                             {"1": "--sampler.kind uniform"}, ("ranks disagree on the resolved config",)),
}


@pytest.fixture(scope="module")
def refusals(data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Every REFUSALS command (``rank_args``: extra arguments for one rank), one launch for all."""
    root = tmp_path_factory.mktemp("refusals")
    commands = [{"args": [*transfer_args(data, root / case, config, *extra), "--train.epochs", "1",
                          "--sampler.cache_dir", str(root / case / "neighbours")],
                 "out": str(root / case / "out"), "rank_args": rank_args}
                for case, (config, extra, rank_args, _) in REFUSALS.items()]
    return launch_sequence(root / "sequence.json", commands, CKTF_DIST_TIMEOUT="20"), root


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_in_one_line_before_the_run_directory(refusals, case):
    done, root = refusals
    one_error_line(command_result(done, root / case / "out"), *REFUSALS[case][3])
    assert all(int((root / case / f"out/rank{rank}.code").read_text()) for rank in (0, 1))  # every rank stops
    assert not (root / case / "run").exists()


def test_unreachable_rank_times_out_naming_the_address(data, tmp_path):
    port = free_port()  # nobody listens there
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CKTF_DIST_TIMEOUT": "3"}
    done = launch([*transfer_args(data, tmp_path, "kd"), "--train.epochs", "1"], nproc=0, **env)
    line = one_error_line(done, f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}", "within 3 s", "(rank 1)")
    assert len(line) < 400
