"""The `vaebench` command: one entry point for the DVC stages and the tools around them."""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import signal
import sys
from pathlib import Path

from pipeline.config import PARAMS_FILE, ConfigError, load_study, parse_study_text
from pipeline.errors import Terminated, VaebenchError
from pipeline.outputs import DISK_FULL, disk_full, write_text

STUDIES_DIR = Path("studies")
PARAMS_RECORD = Path(".vaebench") / "params.sha256"  # params.yaml as vaebench last wrote it


def cmd_prepare(args) -> None:
    from pipeline.prepare import prepare

    prepare(load_study(args.params))


def cmd_classifier(args) -> None:
    from pipeline.classifier import train_classifier

    train_classifier(load_study(args.params))


def cmd_floor(args) -> None:
    from pipeline.floor import compute_floor

    compute_floor(load_study(args.params))


def cmd_train(args) -> None:
    from pipeline.train import train_cell

    train_cell(load_study(args.params), args.cell)


def cmd_evaluate(args) -> None:
    from pipeline.evaluate import evaluate_cell

    evaluate_cell(load_study(args.params), args.cell)


def cmd_report(args) -> None:
    from pipeline.report import build_report

    build_report(load_study(args.params))


def cmd_figures(args) -> None:
    from pipeline.report import cell_figures

    config = load_study(args.params)
    config.cell(args.cell)
    folder = cell_figures(config, args.cell, args.out or Path("figures") / config.study / args.cell)
    say(f"figures of {args.cell} in {folder}/")


def cmd_tune(args) -> None:
    from pipeline.tune import tune
    from pipeline.tuning.search_space import load_space

    space = load_space(args.space)
    tune(load_study(args.params), space, str(args.space), str(args.params), storage=args.storage, workers=args.workers)


def cmd_server(args) -> None:
    from pipeline import server

    if args.action == "start":
        state = server.start(
            args.host, args.port, args.postgres, args.artifacts, args.allowed_hosts, args.auth, args.no_auth
        )
        store = (
            "a private PostgreSQL cluster in " + state["postgres_dir"]
            if state["postgres_dir"]
            else state["backend_store"]
        )
        clients = f"export MLFLOW_TRACKING_URI={state['url']}"
        login = "no login asked (loopback without --auth, or --no-auth)"
        if state["auth"]:  # the password itself is never printed, only the file that holds it
            login = (
                f"login required: the admin login {state['username']} and its password are in "
                f"{state['credentials']} (mode 0600); more users: docs/operations.md"
            )
            clients += f" MLFLOW_TRACKING_USERNAME={state['username']} MLFLOW_TRACKING_PASSWORD=<its password>"
        say(
            f"MLflow tracking server at {state['url']} (PID {state['mlflow_pid']}), runs in {store}, artifacts in "
            f"{state['artifacts']}\n{login}\nclients: {clients}\nstop: vaebench server stop"
        )
    elif args.action == "stop":
        state = server.stop()
        say(f"stopped the server at {state['url']}" if state else "no server of this checkout is running")
    else:
        state = server.read_state()
        running = state is not None and server.alive(state["mlflow_pid"])
        login = ", login required" if running and state.get("auth") else ""
        say(f"running at {state['url']} (PID {state['mlflow_pid']}){login}" if running else "not running")


def cmd_repro(args) -> None:
    from pipeline.shards import ARRAY_INDEX

    sharded = args.shard is not None or ARRAY_INDEX in os.environ
    if sharded and args.jobs is not None:
        where = "--shard" if args.shard is not None else f"a Slurm job array ({ARRAY_INDEX} is set)"
        raise ConfigError(
            f"--jobs runs the whole study on this machine, while {where} runs one share of it; give --jobs "
            "outside a job array, or --shard alone"
        )
    if sharded:
        reproduce_share(args)
        return
    from pipeline.parallel import default_jobs, machine_cores, repro_parallel

    config = load_study(args.params)
    jobs = args.jobs if args.jobs is not None else default_jobs(config.threads, machine_cores())
    ran = repro_parallel(config, jobs)
    in_jobs = f": {len(ran)} piece(s) of work ran in parallel jobs ({', '.join(ran)})" if jobs > 1 else ""
    say(f"study {config.study!r} reproduced with --jobs {jobs}{in_jobs}")


def reproduce_share(args) -> None:
    from pipeline.shards import parse_shard, repro_shard

    index, count = parse_shard(args.shard)
    cells = repro_shard(load_study(args.params), index, count, push=not args.no_push)
    say(
        f"shard {index}/{count}: reproduced {len(cells)} cell(s){'' if args.no_push else ' and pushed them'}: "
        f"{', '.join(cells)}"
    )


def cmd_enable_tune(args) -> None:
    """Add a search space to params.yaml's `tune:` block (keeping its comments), so DVC has a tune@NAME stage."""
    from ruamel.yaml import YAML

    from pipeline.tuning.search_space import load_space

    space = load_space(args.space)
    if space.name != args.space.stem:
        raise ConfigError(f"{args.space}: name is {space.name!r}; make it the file's name {args.space.stem!r}")
    round_trip = YAML()
    if not args.params.is_file():
        raise ConfigError(f"{args.params} not found; run from the repository root or pass --params")
    document = round_trip.load(args.params.read_text())
    if not document.get("tune"):
        document["tune"] = {}
    document["tune"][space.name] = str(args.space)
    text = io.StringIO()
    round_trip.dump(document, text)
    write_params(args.params, text.getvalue(), unsaved_edits(args.params))
    say(f"{args.params}: tune@{space.name} runs {args.space}; run `dvc repro tune@{space.name}`")


def cmd_bench(args) -> None:
    from pipeline.bench import run_bench, table, write_results

    results = run_bench(
        load_study(args.params),
        args.cells,
        args.images,
        None if args.no_full else args.reference_cell,
        study=args.study,
        runs=args.runs,
        params_file=args.params,
    )
    written = write_results(results)  # before printing: a closed stdout must not lose the measurements
    say(table(results))
    say(f"written to {written}")


def cmd_check(args) -> None:
    from pipeline.engine import resolve_device
    from pipeline.memory import check_memory

    config = load_study(args.params)
    for cell in config.cells.values():
        check_memory(cell, config.data.train_size, resolve_device(cell.device), val_images=config.data.val_size)
    say(f"{args.params}: study {config.study!r}, {len(config.cells)} cells")
    for cell in config.cells.values():
        setting = f" {cell.settings.label()}" if cell.settings.label() else ""
        say(
            f"  {cell.name}: {cell.family} {cell.arch} latent_dim={cell.latent_dim}{setting} seed={cell.seed} "
            f"epochs={cell.epochs}"
        )


def cmd_table(args) -> None:
    from pipeline.floor import load_floor
    from pipeline.reporting.results import cell_table, markdown_family_table, markdown_sample_table, markdown_table

    cells = cell_table(load_study(args.params))
    say(markdown_table(cells))
    say("")
    say(markdown_family_table(cells))
    say("")
    say(markdown_sample_table(cells, load_floor()))


def cmd_verify(args) -> None:
    from pipeline import verify

    differences, lines = verify.verify(load_study(args.params), args.revision)
    for line in lines:
        say(line)
    beyond = [d for d in differences if d.beyond]
    if beyond:
        raise verify.NotReproduced(
            f"{len(beyond)} metric value(s) differ from the committed study beyond the seed spread (listed above): "
            "more than another machine's rounding; check the install (make setup) and the data (its SHA256SUMS)"
        )


def cmd_use_study(args) -> None:
    source = Path(args.name) if args.name.endswith(".yaml") else STUDIES_DIR / f"{args.name}.yaml"
    if not source.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"no study file {source}; the studies are: {known}")
    config = load_study(source)
    if not args.force and unsaved_edits(args.params):
        raise ConfigError(
            f"{args.params} holds edits that no study file has (made since the last `vaebench use-study`); save "
            f"them first (cp {args.params} studies/NAME.yaml), or pass --force to discard them"
        )
    write_params(args.params, source.read_text(), keep_edits=False)
    say(f"{args.params} now holds study {config.study!r} ({len(config.cells)} cells); run `dvc repro`")


def unsaved_edits(params: Path) -> bool:
    """Whether params.yaml differs from every study file and from what vaebench last wrote there."""
    if not params.is_file():
        return False
    text = params.read_text()
    recorded = PARAMS_RECORD.read_text().strip() if PARAMS_RECORD.is_file() else None
    if recorded == hashlib.sha256(text.encode()).hexdigest():
        return False
    return all(study.read_text() != text for study in STUDIES_DIR.glob("*.yaml"))


def write_params(params: Path, text: str, keep_edits: bool) -> None:
    """Replace params.yaml with `text` only once it validates, in one step. Unless it keeps the user's
    unsaved edits, record it as written by vaebench (use-study may then replace it)."""
    parse_study_text(text, str(params))
    write_text(params, text)
    if not keep_edits:
        write_text(PARAMS_RECORD, hashlib.sha256(text.encode()).hexdigest() + "\n")


class _StdoutClosed(Exception):
    """The reader of stdout went away (`vaebench table | head`)."""


def say(text: str) -> None:
    """print() for the command's output, which its reader may stop reading."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise _StdoutClosed from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaebench", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="study parameters (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="verify MNIST and write the train/val/test arrays").set_defaults(
        run=cmd_prepare
    )
    commands.add_parser("classifier", help="train the MNIST CNN behind the *_mnist_cnn scores").set_defaults(
        run=cmd_classifier
    )
    commands.add_parser(
        "floor", help="score real training digits: the floor of every sample-quality score"
    ).set_defaults(run=cmd_floor)
    for name, handler, text in (
        ("train", cmd_train, "train one grid cell"),
        ("evaluate", cmd_evaluate, "evaluate one trained grid cell on the test set"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("cell", help="a cell name from params.yaml (see `vaebench check`)")
        sub.set_defaults(run=handler)
    commands.add_parser("report", help="write the study report to reports/<study>/").set_defaults(run=cmd_report)
    figures = commands.add_parser("figures", help="draw one trained cell's figures (default: figures/<study>/<cell>/)")
    figures.add_argument("cell")
    figures.add_argument("--out", type=Path, help="output folder")
    figures.set_defaults(run=cmd_figures)
    tune = commands.add_parser("tune", help="run (or resume) an Optuna tuning study from a search-space file")
    tune.add_argument("space", type=Path, help="for example studies/tune/default.yaml")
    tune.add_argument("--storage", help="Optuna storage URL (default: VAEBENCH_OPTUNA_STORAGE or sqlite:///optuna.db)")
    tune.add_argument(
        "--workers", type=positive_int, help="worker processes sharing the study (default: the file's workers)"
    )
    tune.set_defaults(run=cmd_tune)
    serve = commands.add_parser("server", help="a shared MLflow tracking server on PostgreSQL (start/stop/status)")
    serve.add_argument("action", choices=("start", "stop", "status"))
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=positive_int, default=5000)
    serve.add_argument(
        "--postgres",
        help="an existing database, postgresql://USER[:PASSWORD]@HOST:PORT/DB (default: a "
        "private cluster under .vaebench/server/postgres)",
    )
    serve.add_argument(
        "--artifacts", type=Path, help="where the server keeps artifacts (default .vaebench/server/artifacts)"
    )
    serve.add_argument("--allowed-hosts", help="Host headers the server accepts besides localhost and private IPs")
    serve.add_argument(
        "--auth",
        action="store_true",
        help="ask for a login also on loopback (on by default beyond loopback); the admin's is in "
        ".vaebench/server/credentials",
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="beyond loopback, ask for no login: anyone reaching the port can change or delete every run",
    )
    serve.set_defaults(run=cmd_server)
    repro = commands.add_parser(
        "repro",
        help="reproduce the study with its independent stages N at a time (--jobs), or share I of N of its cells "
        "on several machines (--shard)",
    )
    repro.add_argument(
        "--jobs",
        type=positive_int,
        help="pieces of work at a time on this machine (default: the cores divided by the study's threads)",
    )
    repro.add_argument(
        "--shard", help="I/N with I = 0..N-1: this machine's share (default inside a Slurm job array: its task)"
    )
    repro.add_argument("--no-push", action="store_true", help="with --shard: reproduce only, push nothing")
    repro.set_defaults(run=cmd_repro)
    enable = commands.add_parser("enable-tune", help="add a search space to params.yaml as DVC stage tune@NAME")
    enable.add_argument("space", type=Path)
    enable.set_defaults(run=cmd_enable_tune)
    bench = commands.add_parser(
        "bench", help="measure the training engine against the standard loop and the compute bound"
    )
    bench.add_argument("--cells", nargs="+", default=["linear-z20-b1-s0", "conv-z10-b1-s0"])
    bench.add_argument("--images", type=int, default=20_000, help="training images per throughput measurement")
    bench.add_argument(
        "--reference-cell",
        default="linear-z20-b1-s0",
        help="the cell trained and evaluated as whole processes beside the classic recipe",
    )
    bench.add_argument("--no-full", action="store_true", help="skip the whole-process comparison")
    bench.add_argument(
        "--runs", type=positive_int, default=3, help="repeats of every measurement (the table shows their spread)"
    )
    bench.add_argument(
        "--study",
        action="store_true",
        help="also time `dvc repro` of the study from clean, by stage (about half an hour on 2 cores)",
    )
    bench.set_defaults(run=cmd_bench)
    commands.add_parser("check", help="validate the parameters and list the cells").set_defaults(run=cmd_check)
    commands.add_parser("table", help="print the study's test metrics as a Markdown table").set_defaults(run=cmd_table)
    check = commands.add_parser(
        "verify", help="compare the reproduced study's metrics with the committed ones, within the seed spread"
    )
    check.add_argument("--revision", default="HEAD", help="the Git revision whose committed metrics to compare with")
    check.set_defaults(run=cmd_verify)
    use = commands.add_parser("use-study", help="make studies/NAME.yaml (or a study file) the active params.yaml")
    use.add_argument("name", help="a study name from studies/, or the path of a study .yaml file")
    use.add_argument("--force", action="store_true", help="replace params.yaml even if it holds unsaved edits")
    use.set_defaults(run=cmd_use_study)
    return parser


def _terminate(signum, frame):
    # An exception, so that open MLflow runs end KILLED instead of staying RUNNING.
    raise Terminated()


class _QuietOnClosedPipe(logging.StreamHandler):
    """Log lines to stderr until its reader goes away (`... 2>&1 | head`), then drop them: the work goes on."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _to_devnull(self.stream)
        else:
            super().handleError(record)


def _to_devnull(stream) -> None:
    """Point a stream whose reader went away at /dev/null, so that every later write (other loggers', the
    flush at exit) succeeds instead of failing the process."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _flush_or_silence(stream) -> None:
    try:
        stream.flush()
    except BrokenPipeError:
        _to_devnull(stream)
        stream.flush()


def checkout_root(start: Path) -> Path | None:
    """The folder a command works in: the nearest one up from `start` with a dvc.yaml or a params.yaml (the
    checkout's root, or the app's workspace, which has a params.yaml of its own)."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() or (folder / PARAMS_FILE).is_file():
            return folder
    return None


# The arguments that name files, which the user gives relative to the folder the command runs in.
PATH_ARGUMENTS = ("params", "space", "out", "artifacts")


def run_from_checkout_root(args) -> None:
    """Every command works on the checkout's root folder (params.yaml, results/, .vaebench/): run from a
    subfolder, it moves there, keeping the paths the user gave pointing where they did."""
    here = Path.cwd()
    root = checkout_root(here)
    if root is None or root == here:
        return
    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, Path) and value != PARAMS_FILE:
            setattr(args, name, (here / value).resolve())
    if getattr(args, "name", "").endswith(".yaml"):  # use-study with a study file's path
        args.name = str((here / args.name).resolve())
    os.chdir(root)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[vaebench] %(message)s", handlers=[_QuietOnClosedPipe(sys.stderr)])
    # MLflow logs every SQL error with its statement before raising it; the error itself is enough.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run_from_checkout_root(args)
        args.run(args)
    except ConfigError as error:
        print(f"vaebench: error: {error}", file=sys.stderr)
        return 2
    except VaebenchError as error:
        print(f"vaebench: error: {error}", file=sys.stderr)
        return 1
    except _StdoutClosed:  # the reader has what it wanted
        pass
    except Exception as error:
        message = resource_fault(args, error)
        if message is None:  # a bug: its traceback
            raise
        print(f"vaebench: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vaebench {args.command}: interrupted; {stopped_hint(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"vaebench {args.command}: terminated (SIGTERM); {stopped_hint(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        for stream in (sys.stdout, sys.stderr):  # Python's exit must not flush into a closed pipe
            _flush_or_silence(stream)
    return 0


SQLITE_FULL = "database or disk is full"  # SQLite's words, through SQLAlchemy and MLflow


def resource_fault(args, error: Exception) -> str | None:
    """The one line for a machine that ran out of disk or memory mid-command (the run, if one was open, has
    ended FAILED and staged outputs were discarded), or None for any other error."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return str(disk_full(Path(error.filename) if error.filename else Path.cwd()))
    if SQLITE_FULL in str(error):
        from pipeline.tracking import local_store

        return str(disk_full(local_store()))
    from pipeline.memory import is_out_of_memory

    if is_out_of_memory(error):
        what = f"cell {args.cell}" if getattr(args, "cell", None) else f"vaebench {args.command}"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return (
            f"{what} ran out of memory ({reason}); its MLflow run, if one was open, ended FAILED and nothing was "
            "written: lower its latent_dim, hidden, channels or batch_size, or run it on a machine with more memory"
        )
    return None


def stopped_hint(args) -> str:
    """What an interrupted command left, and how to go on: the MLflow run it ended, if it had opened one, and
    for a training whether it can resume."""
    kept = "nothing half-written was kept"
    tracking = sys.modules.get("pipeline.tracking")  # imported only by the commands that log
    # The runs open when the interrupt came are the ones it ended KILLED.
    killed = [run_id for run_id, status in (tracking.ended_runs if tracking else []) if status == "KILLED"]
    runs = f"its MLflow run {', '.join(killed)} ended KILLED" if killed else "no MLflow run was open"
    if args.command == "train":
        resume = "re-run the same command (or dvc repro) to start the training again"
        try:
            config = load_study(args.params)
            from pipeline.paths import resume_file

            if resume_file(config.study, config.cell(args.cell).name).is_file():
                resume = "re-run the same command (or dvc repro) to resume after the last finished epoch"
        except VaebenchError:
            pass
        return f"{runs} and {kept}; {resume}"
    if args.command == "tune":
        if not killed:
            runs = "each worker ended the MLflow run of the trial it was running KILLED"
        return (
            f"{runs}; re-run the same command (or dvc repro) to go on: finished trials are kept, interrupted "
            "ones run again"
        )
    if args.command == "repro":
        return (
            "the running stages ended their MLflow runs KILLED and kept nothing half-written; re-run the same "
            "command to go on (finished stages are restored from DVC's run-cache, trainings resume after their "
            "last finished epoch)"
        )
    if args.command in ("evaluate", "report"):
        return f"{runs} and {kept}; re-run the same command (or dvc repro)"
    return f"{kept}; re-run the same command (or dvc repro)"


if __name__ == "__main__":
    raise SystemExit(main())
