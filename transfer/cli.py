"""The ``cktf`` command line: thin wrappers that load a config and call a stage.

Every command takes ``--config FILE`` plus any config key as ``--section.key VALUE``; ``--help`` lists the
keys. User errors print one line (``Error: …``) and exit 1; ``cktf --debug …`` shows the traceback.

Under ``torchrun`` (``torchrun --nproc_per_node 8 -m transfer.cli transfer …``, or ``torchrun … $(which cktf)
transfer …``) every rank runs the same command; rank 0 prints, and an error that every rank raises alike is
printed once (other ranks' own errors carry their rank).
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys

import click

from transfer import __version__
from transfer.config import TeacherConfig, TransferConfig, describe_options, first_non_name_key, load_config
from transfer.errors import CKTFError, RunInterrupted

OVERRIDABLE = {"ignore_unknown_options": True, "allow_extra_args": False, "help_option_names": ["-h", "--help"]}


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split("CKTFError: ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


class CKTFGroup(click.Group):
    """Turns :class:`CKTFError` into one line on stderr and a non-zero exit, unless ``--debug``.

    A run stopped by SIGINT/SIGTERM after saving a checkpoint prints how to resume it and exits with the
    conventional status (130 for SIGINT, 143 for SIGTERM); Ctrl-C anywhere else exits 130 in one line too.
    """

    def invoke(self, ctx: click.Context):
        from transfer.engine.ranks import env_rank, launched

        main = env_rank() == 0
        try:
            result = super().invoke(ctx)
            if launched():
                from transfer.engine import distributed

                distributed.barrier()  # leave together: a rank still writing files must not see the others gone
            return result
        except CKTFError as err:
            if ctx.meta.get("cktf.debug"):
                raise
            if main:
                raise click.ClickException(one_line(err)) from None
            if getattr(err, "replicated", False):
                ctx.exit(1)  # rank 0 prints it
            raise click.ClickException(f"(rank {env_rank()}) {one_line(err)}") from None
        except RunInterrupted as stop:
            if main:
                again = resume_command(sys.argv, flag=ctx.invoked_subcommand != "demo")
                click.echo(f"stopped by {signal.Signals(stop.signum).name} at epoch {stop.epoch}, batch "
                           f"{stop.batch}: saved {stop.checkpoint}; continue with: {again}", err=True)
            ctx.exit(stop.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("cktf.debug"):
                raise
            if main:
                click.echo(interrupted_line(ctx.invoked_subcommand), err=True)
            ctx.exit(128 + signal.SIGINT)
        finally:
            if launched():
                from transfer.engine import distributed

                distributed.teardown()


def interrupted_line(command: str | None) -> str:
    """What an interrupt outside a training step left: a checkpoint to continue from, or nothing to resume."""
    from transfer.engine.rundir import last_opened_run

    run = last_opened_run()
    if run is None:
        return "interrupted before a run directory was created; nothing to resume"
    if not run.last.is_file():
        return (f"interrupted before {run.path} had a checkpoint; nothing to resume: the same command starts it "
                "afresh")
    return (f"interrupted; {run.last} is the last complete checkpoint; continue with: "
            f"{resume_command(sys.argv, flag=command != 'demo')}")


def resume_command(argv: list[str], flag: bool = True) -> str:
    """The command line that resumes the run ``argv`` started: the same without --overwrite, plus --resume
    (``flag``; ``cktf demo`` resumes its interrupted steps by itself)."""
    args = [a for a in argv[1:] if a != "--overwrite"]
    if flag and "--resume" not in args:
        args.append("--resume")
    from transfer.engine.ranks import launched

    if launched():
        return "torchrun <the same options> -m transfer.cli " + shlex.join(args)
    return shlex.join(["cktf", *args])


def echo_done(message: str) -> None:
    """A command's closing line, printed by rank 0 only under torchrun."""
    from transfer.engine.ranks import env_rank

    if env_rank() == 0:
        click.echo(message)


def configure_logging(debug: bool, quiet: bool) -> None:
    """cktf's own lines at INFO (WARNING with ``-q``); third-party chatter (faiss loader, tensorboard, matplotlib)
    only with ``--debug``."""
    logging.basicConfig(format="%(message)s", level=logging.INFO if debug else logging.WARNING, stream=sys.stderr,
                        force=True)
    logging.getLogger("cktf").setLevel(logging.WARNING if quiet else logging.INFO)
    for name in ("matplotlib", "tensorboard", "PIL"):
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.ERROR)


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """``--debug``/``-q`` given after a subcommand: as if given before it."""
    if value:
        ctx.meta[f"cktf.{param.name}"] = True
        configure_logging(ctx.meta.get("cktf.debug", False), ctx.meta.get("cktf.quiet", False))
    return value


def verbosity_options(command):
    """``--debug`` and ``-q/--quiet``, accepted before or after the subcommand."""
    command = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity,
                           help="Only print warnings and errors.")(command)
    return click.option("--debug", is_flag=True, expose_value=False, callback=_verbosity,
                        help="Show full tracebacks and third-party log lines.")(command)


class ConfigCommand(click.Command):
    """A command whose ``--help`` also lists every config key it accepts as an override."""

    def __init__(self, *args, schema: type, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.schema = schema

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(key, f"{kind}. {text}") for key, kind, text in describe_options(self.schema)]
        with formatter.section("Config keys (override any with --section.key VALUE)"):
            formatter.write_dl(rows)
        super().format_epilog(ctx, formatter)


@click.group(cls=CKTFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@verbosity_options
@click.version_option(__version__, prog_name="cktf")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """cktf: unsupervised cross-domain knowledge transfer.

    \b
    1. cktf train-teacher   supervised teacher on a labeled source domain
       cktf import-teacher  or: pretrained weights (torchvision, .pth, .safetensors)
    2. cktf transfer        KD / CRD / CKTF to a student on the unlabeled target
                            (cktf methods: the loss terms and their options)
    3. cktf probe           linear probe of the frozen student on the target
    4. cktf compare         convergence curves and a table of several runs

    Ctrl-C or SIGTERM during training saves a checkpoint after the current step; rerun the same command with
    --resume to continue exactly where it stopped.
    """
    configure_logging(ctx.meta.get("cktf.debug", False), ctx.meta.get("cktf.quiet", False))


def load_command_config(config_path: str, schema: type, overrides: tuple[str, ...]):
    """``load_config`` for the running command: a misspelt option of its own (``--resum``) gets a did-you-mean."""
    from transfer.config.shipped import resolve_config_path

    command = click.get_current_context().command
    options = [name for param in command.params for name in param.opts if name.startswith("--")]
    return load_config(resolve_config_path(config_path), schema, overrides, options)


_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                       help="YAML config file, or the name of a shipped one (e.g. image_folder/cktf.yaml; `cktf "
                            "configs` lists them); it may build on others with `base: FILE` or `base: [FILE, ...]`.")


def run_options(where: str):
    """``--resume``, ``--overwrite`` and ``--allow-change`` for a command writing its run into ``where``."""
    def decorate(command):
        for option in reversed([
            click.option("--resume", is_flag=True, help=f"Continue the run in {where} from its last checkpoint "
                         "(a run without one starts afresh)."),
            click.option("--overwrite", is_flag=True, help=f"Delete the files cktf wrote in {where} (checkpoints, "
                         "config, metrics, events, nested probe results) and start again; anything else there "
                         "stays, and a directory cktf did not create is refused."),
            click.option("--allow-change", "allow_change", multiple=True, metavar="KEY",
                         help="With --resume: accept a changed value of config KEY (repeatable), e.g. "
                         "--allow-change train.epochs to extend a finished run; recorded in resumes.jsonl."),
        ]):
            command = option(command)
        return command
    return decorate


def _request(resume: bool, overwrite: bool, allow_change: tuple[str, ...]):
    from transfer.stages.common import RunRequest

    return RunRequest(resume=resume, overwrite=overwrite, allow_change=tuple(allow_change))


@cli.command("train-teacher", cls=ConfigCommand, schema=TeacherConfig, context_settings=OVERRIDABLE)
@_CONFIG
@run_options("<log.root>/<log.name>")
@verbosity_options
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--section.key VALUE]...")
def train_teacher_cmd(config_path: str, resume: bool, overwrite: bool, allow_change: tuple[str, ...],
                      overrides: tuple[str, ...]) -> None:
    """Train a supervised teacher on the labeled source dataset.

    Writes last.safetensors (every epoch), best.safetensors (best validation accuracy),
    config.yaml, metrics.json and TensorBoard events to <log.root>/<log.name>.
    """
    cfg = load_command_config(config_path, TeacherConfig, overrides)
    from transfer.stages.teacher import train_teacher

    result = train_teacher(cfg, _request(resume, overwrite, allow_change))
    final = result.final
    msg = f"done: {cfg.log.root}/{cfg.log.name}"
    if "test/acc" in final:
        msg += f"  final test/acc {100 * final['test/acc']:.2f}%"
    if result.best_epoch is not None:
        msg += f"  best val/acc {100 * result.best_value:.2f}% (epoch {result.best_epoch})"
    echo_done(msg)


@cli.command("transfer", cls=ConfigCommand, schema=TransferConfig, context_settings=OVERRIDABLE)
@_CONFIG
@click.option("--teacher", "teacher_path", type=click.Path(dir_okay=False),
              help="Teacher checkpoint (best.safetensors of cktf train-teacher, or written by cktf "
              "import-teacher); sets teacher.checkpoint.")
@run_options("<log.root>/<log.name>")
@verbosity_options
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--section.key VALUE]...")
def transfer_cmd(config_path: str, teacher_path: str | None, resume: bool, overwrite: bool,
                 allow_change: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Transfer a frozen teacher's knowledge to a student on the unlabeled target split.

    The method is the set of terms under loss.terms, each with its own options, e.g. --loss.terms.kd.weight
    0.9 --loss.terms.kd.temperature 4 (configs/*/{kd,crd,cktf,cktf_kd}.yaml); `cktf methods` lists every term
    and its options. Writes last.safetensors (student, projection heads, memory banks, Z), config.yaml,
    metrics.json and TensorBoard events (one scalar per loss term) to <log.root>/<log.name>.
    """
    if teacher_path is not None:
        overrides = (*overrides, "--teacher.checkpoint", teacher_path)
    cfg = load_command_config(config_path, TransferConfig, overrides)
    from transfer.stages.transfer import run_transfer

    result = run_transfer(cfg, _request(resume, overwrite, allow_change))
    msg = f"done: {cfg.log.root}/{cfg.log.name}  method {cfg.loss.method}"
    if result.history:
        first, final = result.history[0], result.final
        msg += (f"  loss {first['train/loss_epoch']:.4f} (epoch 1) -> {final['train/loss_epoch']:.4f} "
                f"(epoch {int(final['epoch'])})")
    echo_done(msg)


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """``0.485,0.456,0.406`` -> a tuple of floats (one per channel)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _mapping(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """A YAML/JSON mapping given inline, e.g. ``{stem: maxpool, stages: [layer1], ...}``."""
    if value is None:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        loaded = None
    bad = first_non_name_key(loaded) if isinstance(loaded, dict) else None
    if bad is not None:
        raise click.BadParameter(f"key '{bad}' is not a name; expected names such as stem, stages, penultimate, "
                                 "logits")
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"expected a mapping such as '{{stem: maxpool, stages: [layer1, layer2], "
                                 f"penultimate: flatten, logits: fc}}', got {value!r}")
    return loaded


@cli.command("import-teacher")
@click.option("--arch", required=True, help="Architecture of the weights: a registry name (cktf models), "
              "torchvision.<arch> (e.g. torchvision.resnet50) or timm.<name> (e.g. timm.convnext_atto; needs "
              "pip install 'cktf[timm]').")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="A PyTorch state dict (.pth/.pt, read with weights_only: pickled code is refused) or a "
              ".safetensors file; a 'module.'/'model.' key prefix and a {'state_dict': ...} wrapper are undone.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Teacher checkpoint to write (.safetensors), for cktf transfer --teacher.")
@click.option("--num-classes", type=click.IntRange(1), default=None,
              help="Classes of the classifier  [default: read off the weights]")
@click.option("--in-channels", type=click.IntRange(1), default=None,
              help="Input channels  [default: read off the weights; 3 for torchvision]")
@click.option("--image-size", type=click.IntRange(8), default=None,
              help="Side length the network expects; transfer and probe resize to it unless data.image_size is "
              "set  [default: 224 for torchvision, timm's pretrained_cfg for timm, else the dataset's]")
@click.option("--mean", callback=_floats, default=None, metavar="M1,M2,M3",
              help="Normalisation mean the network expects  [default: ImageNet's for torchvision, timm's "
              "pretrained_cfg for timm]")
@click.option("--std", callback=_floats, default=None, metavar="S1,S2,S3",
              help="Normalisation std the network expects  [default: ImageNet's for torchvision, timm's "
              "pretrained_cfg for timm]")
@click.option("--taps", callback=_mapping, default=None, metavar="MAPPING",
              help="Tap node names for architectures without default taps (YAML/JSON mapping with stem, stages, "
              "penultimate, logits).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@verbosity_options
def import_teacher_cmd(arch: str, weights: str, out: str, num_classes: int | None, in_channels: int | None,
                       image_size: int | None, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                       taps: dict | None, overwrite: bool) -> None:
    """Import pretrained weights (e.g. torchvision's ImageNet ones) as a teacher for cktf transfer.

    Checks that every key and shape of the weights fits ARCH and that the network runs, then writes a
    teacher checkpoint recording the architecture, classes, taps and the input size and normalisation it
    expects. Nothing is downloaded.
    """
    from pathlib import Path

    from transfer.stages.import_teacher import ImportRequest, import_teacher

    done = import_teacher(ImportRequest(arch, Path(weights), Path(out), num_classes, in_channels, image_size, mean,
                                        std, taps, overwrite))
    size = done.input.image_size or "dataset default"
    click.echo(f"done: {done.path}  {done.arch}, {done.in_channels} channels, {done.num_classes} classes, "
               f"{done.parameters / 1e6:.1f}M parameters, input {size}")


def _probe_schema() -> type:
    from linear_probe.config import ProbeConfig

    return ProbeConfig


@cli.command("probe", cls=ConfigCommand, schema=_probe_schema(), context_settings=OVERRIDABLE)
@_CONFIG
@click.option("--student", "student_path", type=click.Path(dir_okay=False),
              help="Checkpoint to probe: last.safetensors of a transfer run (or a teacher's, for its own features).")
@run_options("the probe directory (probe.out, default <checkpoint's run dir>/probe)")
@verbosity_options
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--section.key VALUE]...")
def probe_cmd(config_path: str, student_path: str | None, resume: bool, overwrite: bool,
              allow_change: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Train a linear probe on a frozen network's penultimate features.

    Fits on the target's labeled train split and evaluates on its test split after every epoch; writes
    TensorBoard curves (probe/test_acc, probe/train_loss, probe/knn_acc), metrics.json and config.yaml to
    <run>/probe/ (or probe.out).
    """
    from linear_probe.config import ProbeConfig

    cfg = load_command_config(config_path, ProbeConfig, overrides)
    from linear_probe.stage import run_probe

    m = run_probe(cfg, student_path, _request(resume, overwrite, allow_change))
    knn = f"  kNN {100 * m['knn_acc']:.2f}%" if m["knn_acc"] is not None else ""
    echo_done(f"done: {m['method']}  probe test acc {100 * m['final_acc']:.2f}% after {m['epochs']} epochs{knn}")


@cli.command("compare")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the plot and tables.")
@click.option("--title", default=None, help="Title of the report.")
@click.option("--label", "labels", multiple=True, metavar="DIR=NAME",
              help="Report the run DIR (as given in RUNS) as method NAME, e.g. to tell two settings of one method "
              "apart. Repeatable.")
@verbosity_options
def compare_cmd(runs: tuple[str, ...], out: str, title: str | None, labels: tuple[str, ...]) -> None:
    """Compare probed runs: convergence plot (PNG) and a Markdown + CSV table.

    RUNS are transfer run directories holding probe/ results (or probe directories). Runs of the same method
    are seeds of one setting and are averaged (mean ± std, shaded bands); runs whose saved configs differ in
    more than the seed are refused, unless --label tells them apart.
    """
    from linear_probe.compare import compare

    named: dict[str, str] = {}
    for item in labels:
        path, sep, name = item.rpartition("=")
        if not sep or not path or not name.strip():
            raise CKTFError(f"--label {item!r}: expected DIR=NAME, e.g. --label runs/b_cktf=cktf_224px")
        named[path] = name.strip()
    paths = compare(list(runs), out, title, named)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@cli.command("configs")
@click.option("--copy", "folder", default=None, metavar="FOLDER",
              help="Copy the shipped folder FOLDER (e.g. image_folder) into --to, to edit; never overwrites.")
@click.option("--to", "dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where --copy puts the folder.")
@verbosity_options
def configs_cmd(folder: str | None, dest: str) -> None:
    """List the configs that come with cktf, or copy a folder of them.

    Any of them can be named from anywhere, e.g. `cktf transfer --config image_folder/cktf.yaml`, when no such
    file exists relative to the current directory.
    """
    from transfer.config.shipped import copy_shipped, list_shipped, shipped_configs_dir

    if folder is None:
        click.echo(f"# shipped configs ({shipped_configs_dir()}); pass one as --config FOLDER/FILE.yaml")
        for name in list_shipped():
            click.echo(name)
        return
    for path in copy_shipped(folder, dest):
        click.echo(f"copied {path}")


@cli.command("demo", context_settings=OVERRIDABLE)
@click.option("--runs", "runs_root", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Directory for all runs of the demo.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1, 20),
              help="Transfer/probe seeds (0..N-1); the report shows mean ± std over them.")
@click.option("--only-seeds", default=None, metavar="S1,S2",
              help="Run the steps of these seeds only (e.g. 1,2: a second process next to one running seed 0); "
              "the report still covers what --seeds names.")
@click.option("--configs", "configs", default=None, type=click.Path(file_okay=False),
              help="Proxy config directory (teacher, ceiling, probe and one YAML per method) [default: "
              "configs/fashion_lowres].")
@click.option("--methods", default="kd,crd,cktf", show_default=True, metavar="M1,M2",
              help="Transfer methods: names of <configs>/<method>.yaml, e.g. kd,crd,cktf,cktf_reference.")
@click.option("--out", "report", default=None, type=click.Path(file_okay=False),
              help="Directory for the comparison report [default: reports/<proxy>].")
@verbosity_options
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--section.key VALUE]...")
def demo_cmd(runs_root: str, seeds: int, only_seeds: str | None, configs: str | None, methods: str,
             report: str | None, overrides: tuple[str, ...]) -> None:
    """The whole pipeline on the CPU proxy: teacher, KD/CRD/CKTF transfers, probes, controls, comparison.

    Controls: raw pixels, a randomly initialised student, the teacher's own features, CKTF from an untrained
    teacher, and a supervised ceiling (the student trained with all target labels). Finished runs are reused
    and interrupted ones resumed, so running it again only does what is missing. Overrides (e.g. --data.root
    DIR) apply to every step.
    """
    from linear_probe.demo import CONFIGS, run_demo, run_seeds

    chosen = [m for m in methods.split(",") if m]
    from transfer.config.shipped import resolve_config_path

    kwargs = {"configs": CONFIGS if configs is None else resolve_config_path(configs), "methods": tuple(chosen)}
    if only_seeds is not None:
        try:
            subset = sorted({int(s) for s in only_seeds.split(",") if s.strip()})
        except ValueError:
            raise CKTFError(f"--only-seeds {only_seeds!r}: expected seed numbers like 1,2") from None
        run_seeds(runs_root, subset, overrides, **kwargs)
        return
    paths = run_demo(runs_root, list(range(seeds)), report, overrides, **kwargs)
    click.echo(paths["md"].read_text())
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@cli.command("methods")
@verbosity_options
def methods_cmd() -> None:
    """List the loss terms a transfer can combine, with their options and papers.

    A method is a set of terms in the config: loss.terms.<name>.<option> (YAML or --loss.terms.NAME.OPTION
    VALUE). The contrastive terms share loss.nce (see `cktf transfer --help`).
    """
    from transfer.losses.terms import TERMS
    from transfer.losses.terms.listing import describe_terms

    click.echo(describe_terms(TERMS))


@cli.command("models")
@verbosity_options
def models_cmd() -> None:
    """List the registered model names (also accepted: torchvision.<arch> and timm.<name>, the latter with
    pip install 'cktf[timm]')."""
    from transfer.models import list_models

    for name in list_models():
        click.echo(name)


def main() -> None:
    cli(prog_name="cktf")


if __name__ == "__main__":
    main()
