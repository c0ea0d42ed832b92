"""From nothing to training on a Cloud TPU slice: create it, install the code on every worker, start training, follow
the log, stop (a checkpoint is saved), delete.

    python launch/tpu.py up my-tpu --zone=us-east5-a --project=my-proj --accelerator-type=v5p-8 \\
        --repo=https://github.com/OWNER/hyvideo_jax.git --config=configs/hunyuan_video_13b_lora.py \\
        --workdir=gs://my-bucket/run --config.train.init_from=gs://my-bucket/dit --config.data.path=gs://my-bucket/clips
    python launch/tpu.py logs my-tpu --zone=us-east5-a --project=my-proj
    python launch/tpu.py stop my-tpu --zone=us-east5-a --project=my-proj
    python launch/tpu.py delete my-tpu --zone=us-east5-a --project=my-proj

Subcommands: create, install, train, logs, stop, delete, and up (create → install → train). Each validates all its
arguments before running anything, prints every command (shell-quoted, so it can be pasted) before running it, and
with --dry-run only prints. It needs only Python's standard library and the gcloud CLI, so it runs on a laptop; the
training config is loaded (to check the mesh against --slices) only where its dependencies are installed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout this script belongs to

# XLA/libtpu flags for compute/collective overlap on TPU, exported as LIBTPU_INIT_ARGS by `train`. These are the
# overlap flags MaxText's v5e/v5p/v6e training scripts and maxdiffusion's video-model training set (FSDP over the
# slice, data parallel across slices: the layout of config.mesh).
LIBTPU_FLAGS = (
    # Fuse asynchronous collectives with the compute XLA schedules between their start and done, so both run at once.
    ("xla_tpu_enable_async_collective_fusion", "true"),
    # Let that fusion take all-gathers (FSDP gathers each layer's parameters before using them).
    ("xla_tpu_enable_async_collective_fusion_fuse_all_gather", "true"),
    # Continue one asynchronous collective over several fusions, so a large gather hides behind more compute.
    ("xla_tpu_enable_async_collective_fusion_multiple_steps", "true"),
    # Overlap compute and communication on a single TensorCore.
    ("xla_tpu_overlap_compute_collective_tc", "true"),
    # Run all-gathers asynchronously (the flags above choose how).
    ("xla_enable_async_all_gather", "true"),
    # Overlap the data-parallel all-reduces over DCN (the gradient sum across slices) with compute.
    ("xla_tpu_enable_data_parallel_all_reduce_opt", "true"),
    # Pipeline those all-reduces across iterations even when their sizes differ (more overlap, a little more memory).
    ("xla_tpu_data_parallel_opt_different_sized_ops", "true"),
)
LIBTPU_INIT_ARGS = " ".join(f"--{name}={value}" for name, value in LIBTPU_FLAGS)

# TPU families: accepted slice sizes (the number in the accelerator type), its unit, the software version to create
# the VMs with (https://cloud.google.com/tpu/docs/runtimes) and how many VMs (hosts) a slice of size n has.
FAMILIES = {
    "v4": dict(sizes=range(8, 8192 + 1, 8), unit="TensorCores", runtime="tpu-ubuntu2204-base",
               hosts=lambda n: n // 8),
    "v5p": dict(sizes=range(8, 12288 + 1, 8), unit="TensorCores", runtime="v2-alpha-tpuv5", hosts=lambda n: n // 8),
    "v5litepod": dict(sizes=(1, 4, 8, 16, 32, 64, 128, 256), unit="chips", runtime="v2-alpha-tpuv5-lite",
                      hosts=lambda n: 1 if n <= 8 else n // 4),
    "v6e": dict(sizes=(1, 4, 8, 16, 32, 64, 128, 256), unit="chips", runtime="v2-alpha-tpuv6e",
                hosts=lambda n: 1 if n <= 8 else n // 4),
}

# Where things live on each worker (under the login user's home).
CODE_NAME = "hyvideo_jax"
CODE_DIR = f"~/{CODE_NAME}"
VENV = "~/hyvideo_venv"
LOG = "~/hyvideo_train.log"
PID = "~/hyvideo_train.pid"
REMOTE_TARBALL = "hyvideo_jax-src.tar.gz"       # home-relative, as gcloud's scp takes it
PYTHON = "3.12"                                  # the VM images' system Python is older than JAX's 3.11
TAIL_LINES = 200
WAIT_SECONDS = 30                                # between checks of a queued resource's state
FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
PROJECT_RE = re.compile(r"^([a-z0-9][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
VERSION_RE = re.compile(r"^[a-z0-9][-a-z0-9._]*$")
OVERRIDE_RE = re.compile(r"^--config(\.[A-Za-z_][A-Za-z0-9_]*)+=")
SKIP_PACKING = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "build", "dist"}


class UsageError(Exception):
    """A bad argument: reported as one `error: ...` line and exit status 2, before anything runs."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as UsageError (one line), not a usage dump."""

    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------- validation
def check_common(args) -> None:
    """NAME, --zone and --project: present and well formed."""
    if not NAME_RE.match(args.name):
        raise UsageError(f"{args.name!r} is not a valid TPU name: lowercase letters, digits and hyphens, starting "
                         f"with a letter, not ending with a hyphen, at most 63 characters")
    if not args.zone:
        raise UsageError("--zone is required: the zone of the slice, e.g. --zone=us-east5-a")
    if not ZONE_RE.match(args.zone):
        raise UsageError(f"--zone={args.zone} is not a zone name such as us-east5-a")
    if not args.project:
        raise UsageError("--project is required: the Google Cloud project ID, e.g. --project=my-proj")
    if not PROJECT_RE.match(args.project):
        raise UsageError(f"--project={args.project} is not a project ID (6-30 lowercase letters, digits, hyphens)")
    slices = getattr(args, "slices", 1)
    if slices < 1:
        raise UsageError(f"--slices={slices}: needs at least 1 slice")
    if slices > 1 and len(f"{args.name}-{slices - 1}") > 63:
        raise UsageError(f"{args.name!r} is too long for {slices} slices: the nodes are named {args.name}-0 ... "
                         f"{args.name}-{slices - 1}, at most 63 characters")


def accelerator(text: str | None) -> tuple[str, int, int]:
    """(family, size, hosts per slice) of an accelerator type such as v5p-8, or a UsageError naming the families."""
    if not text:
        raise UsageError("--accelerator-type is required: the slice type, e.g. --accelerator-type=v5p-8")
    known = "; ".join(f"{family}-N ({describe_sizes(spec)})" for family, spec in FAMILIES.items())
    match = re.match(r"^([a-z0-9]+)-([0-9]+)$", text)
    if not match or match.group(1) not in FAMILIES:
        raise UsageError(f"--accelerator-type={text} is not a known TPU type; the families are: {known}")
    family, size = match.group(1), int(match.group(2))
    spec = FAMILIES[family]
    if size not in spec["sizes"]:
        raise UsageError(f"--accelerator-type={text}: {family} slices come as {family}-N with "
                         f"{describe_sizes(spec)}")
    return family, size, spec["hosts"](size)


def describe_sizes(spec) -> str:
    sizes = spec["sizes"]
    if isinstance(sizes, range):
        return f"N {spec['unit']}, a multiple of {sizes.step} from {sizes.start} to {sizes[-1]}"
    return f"N {spec['unit']} in {', '.join(map(str, sizes))}"


def nodes(args) -> list[str]:
    """TPU VM node names: NAME, or NAME-0 ... NAME-(k-1) for k slices (the names --node-prefix=NAME gives them)."""
    slices = getattr(args, "slices", 1)
    return [args.name] if slices == 1 else [f"{args.name}-{i}" for i in range(slices)]


def where(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def ssh(args, node: str, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *where(args), f"--worker={worker}",
            f"--command={command}"]


# ----------------------------------------------------------------------------------------------------- plans
# A plan is a list of steps, built (and so validated) completely before anything runs:
#   ("run", argv)                 a gcloud command
#   ("wait", argv)                a queued resource's state query, repeated until it is ACTIVE
#   ("pack", source, tarball)     the local checkout packed into a tarball
def plan_create(args) -> list:
    check_common(args)
    family, _, _ = accelerator(args.accelerator_type)
    version = args.version or FAMILIES[family]["runtime"]
    if not VERSION_RE.match(version):
        raise UsageError(f"--version={version} is not a TPU software version such as {FAMILIES[family]['runtime']}")
    if args.spot and args.preemptible:
        raise UsageError("--spot and --preemptible exclude each other: pick one")
    if args.slices > 1 and not args.queued:
        raise UsageError(f"--slices={args.slices} needs --queued: several slices are created together as one queued "
                         f"resource")
    if args.preemptible and args.queued:
        raise UsageError("--preemptible applies to TPU VMs created directly; queued resources take --spot")
    network = [f"--network={args.network}"] if args.network else []
    if args.queued:
        placement = [f"--node-id={args.name}"] if args.slices == 1 else [
            f"--node-count={args.slices}", f"--node-prefix={args.name}"]
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *placement, *where(args),
                f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}", *network]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *where(args),
                f"--accelerator-type={args.accelerator_type}", f"--version={version}", *network]
        if args.preemptible:
            argv.append("--preemptible")
    if args.spot:
        argv.append("--spot")
    return [("run", argv)]


def plan_wait(args) -> list:
    """After a queued create: its nodes exist once the queued resource is ACTIVE."""
    return [("wait", ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *where(args),
                      "--format=value(state.state)"])]


def plan_install(args) -> list:
    check_common(args)
    if bool(args.repo) == bool(args.source):
        raise UsageError("install needs the code from exactly one place: --repo=URL (git clone of --ref) or "
                         "--source=DIR (a local checkout, copied)")
    setup = (f"set -e; python3 -m pip install --user --quiet --upgrade uv; [ -x {VENV}/bin/python ] || "
             f"python3 -m uv venv --python {PYTHON} --seed {VENV}; rm -rf {CODE_DIR}")
    pip = f'{VENV}/bin/python -m pip install -e "$HOME/{CODE_NAME}[tpu]"'
    steps = []
    if args.repo:
        for value, flag in ((args.repo, "--repo"), (args.ref, "--ref")):
            if not value or value.startswith("-") or re.search(r"\s", value):
                raise UsageError(f"{flag}={value!r} is not a git {'URL' if flag == '--repo' else 'branch or tag'}")
        fetch = f"git clone --depth 1 --branch {shlex.quote(args.ref)} {shlex.quote(args.repo)} {CODE_DIR}"
        for node in nodes(args):
            steps.append(("run", ssh(args, node, f"{setup}; {fetch}; {pip}")))
        return steps
    source = os.path.abspath(args.source)
    if not os.path.isfile(os.path.join(source, "setup.py")):
        raise UsageError(f"--source={args.source} is not a hyvideo_jax checkout (it has no setup.py)")
    tarball = os.path.join(tempfile.gettempdir(), REMOTE_TARBALL)
    unpack = (f"mkdir -p {CODE_DIR}; tar -xzf ~/{REMOTE_TARBALL} -C {CODE_DIR}; rm -f ~/{REMOTE_TARBALL}")
    steps.append(("pack", source, tarball))
    for node in nodes(args):
        steps.append(("run", ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:{REMOTE_TARBALL}",
                              *where(args), "--worker=all"]))
        steps.append(("run", ssh(args, node, f"{setup}; {unpack}; {pip}")))
    return steps


def plan_train(args) -> list:
    check_common(args)
    _, _, hosts = accelerator(args.accelerator_type)
    config = os.path.normpath(args.config or "")
    if not args.config or not config.startswith("configs" + os.sep) or not config.endswith(".py") or \
            ".." in config.split(os.sep):
        raise UsageError(f"--config={args.config or ''} must be a training config under configs/, e.g. "
                         f"--config=configs/hunyuan_video_13b_lora.py")
    config = config.replace(os.sep, "/")
    if not os.path.isfile(os.path.join(ROOT, config)):
        raise UsageError(f"--config={args.config}: there is no {config} in this checkout")
    if not args.workdir:
        raise UsageError("--workdir is required: where checkpoints and metrics go, e.g. --workdir=gs://bucket/run")
    workers = hosts * args.slices
    if workers > 1 and not args.workdir.startswith("gs://"):
        raise UsageError(f"--workdir={args.workdir} is local to each worker, but {args.accelerator_type} x "
                         f"{args.slices} slice(s) has {workers} workers that must share one workdir: use a gs:// path")
    for override in args.overrides:
        if not OVERRIDE_RE.match(override):
            raise UsageError(f"unrecognized argument {override}: config overrides look like "
                             f"--config.train.num_steps=100")
    check_config(config, args.overrides, args.slices, workers)
    trainer = " ".join(["nohup", f"{VENV}/bin/python", "-m", "hyvideo_jax.train", shlex.quote(f"--config={config}"),
                        shlex.quote(f"--workdir={args.workdir}"), *map(shlex.quote, args.overrides)])
    command = (f"set -e; cd {CODE_DIR}; if [ -f {PID} ] && kill -0 \"$(cat {PID})\" 2>/dev/null; then "
               f"echo \"hyvideo_jax.train is already running on $(hostname)\" >&2; exit 1; fi; "
               f"export LIBTPU_INIT_ARGS=\"{LIBTPU_INIT_ARGS}\"; "
               f"{trainer} >> {LOG} 2>&1 < /dev/null & echo $! > {PID}; "
               f"echo \"training started on $(hostname), log in {LOG}\"")
    return [("run", ssh(args, node, command)) for node in nodes(args)]


def check_config(config: str, overrides: list[str], slices: int, workers: int) -> None:
    """The config's mesh.dcn (its product is the number of slices) against --slices, and jax.distributed on
    several workers. Loading the config needs the package's dependencies; without them, a note says what to check."""
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location("launch_training_config", os.path.join(ROOT, config))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded = module.get_config()
    except ImportError as e:   # e.g. a laptop with only Python and gcloud
        print(f"note: {config} cannot be loaded here ({e}); check that the product of its mesh.dcn is {slices} "
              f"(--slices)" + (" and that it sets train.initialize_distributed" if workers > 1 else ""),
              file=sys.stderr)
        return
    except Exception as e:
        raise UsageError(f"--config={config} does not load: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(ROOT)
    values = {o.split("=", 1)[0][len("--config."):]: o.split("=", 1)[1] for o in overrides}
    dcn = tuple(loaded.get("mesh", {}).get("dcn", (1, 1, 1, 1)))
    if "mesh.dcn" in values:
        try:
            dcn = tuple(ast.literal_eval(values["mesh.dcn"]))
        except (ValueError, SyntaxError, TypeError):
            raise UsageError(f"--config.mesh.dcn={values['mesh.dcn']} is not a tuple such as (2,1,1,1)") from None
    if math.prod(dcn) != slices:
        raise UsageError(f"mesh.dcn {dcn} spans {math.prod(dcn)} slice(s) but --slices={slices}: set "
                         f"--config.mesh.dcn so its product is {slices}, e.g. ({slices},1,1,1)")
    distributed = values.get("train.initialize_distributed",
                             loaded.get("train", {}).get("initialize_distributed", False))
    if workers > 1 and str(distributed).lower() not in ("true", "1"):
        raise UsageError(f"{config} trains in one process, but the slice has {workers} workers: add "
                         f"--config.train.initialize_distributed=True")


def plan_logs(args) -> list:
    check_common(args)
    if not 0 <= args.slice < args.slices:
        raise UsageError(f"--slice={args.slice}: there are {args.slices} slice(s), numbered from 0")
    if args.worker < 0:
        raise UsageError(f"--worker={args.worker}: workers are numbered from 0")
    return [("run", ssh(args, nodes(args)[args.slice], f"tail -n {TAIL_LINES} -F {LOG}", worker=str(args.worker)))]


def plan_stop(args) -> list:
    check_common(args)
    command = (f"if [ -f {PID} ] && kill -0 \"$(cat {PID})\" 2>/dev/null; then kill -TERM \"$(cat {PID})\" && "
               f"echo \"sent SIGTERM to hyvideo_jax.train on $(hostname)\"; else "
               f"echo \"hyvideo_jax.train is not running on $(hostname)\"; fi")
    return [("run", ssh(args, node, command)) for node in nodes(args)]


def plan_delete(args) -> list:
    check_common(args)
    if args.slices > 1 and not args.queued:
        raise UsageError(f"--slices={args.slices} needs --queued: several slices are one queued resource, deleted "
                         f"with its nodes")
    if args.queued:
        return [("run", ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *where(args),
                         "--force", "--quiet"])]
    return [("run", ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *where(args), "--quiet"])]


def plan_up(args) -> list:
    steps = plan_create(args)
    if args.queued:
        steps += plan_wait(args)
    return steps + plan_install(args) + plan_train(args)


# ------------------------------------------------------------------------------------------------- execution
def pack(source: str, tarball: str) -> None:
    """The checkout's files (git's tracked and untracked-but-not-ignored ones; without git, everything but caches,
    environments and .git) into a gzipped tarball, paths relative to the checkout."""
    try:
        listed = subprocess.run(["git", "-C", source, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                check=True, capture_output=True).stdout.decode()
        files = sorted(f for f in listed.split("\0") if f and os.path.isfile(os.path.join(source, f)))
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_PACKING and not d.endswith(".egg-info"))
            files += [os.path.relpath(os.path.join(folder, n), source) for n in sorted(names)]
    with tarfile.open(tarball, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(source, f), arcname=f)


def wait_active(argv: list[str], gcloud: str) -> None:
    while True:
        state = subprocess.run([gcloud, *argv[1:]], check=True, capture_output=True, text=True).stdout.strip()
        print(f"# queued resource state: {state or 'unknown'}", flush=True)
        if state == "ACTIVE":
            return
        if state in FAILED_STATES:
            raise RuntimeError(f"the queued resource is {state}; see `gcloud compute tpus queued-resources describe`")
        time.sleep(WAIT_SECONDS)


def execute(steps: list, dry_run: bool) -> None:
    """Print each step (commands shell-quoted), then run it unless dry_run."""
    gcloud = None
    if not dry_run:
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise UsageError("gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk)")
    for step in steps:
        if step[0] == "pack":
            print(f"# pack {step[1]} into {step[2]}", flush=True)
            if not dry_run:
                pack(step[1], step[2])
            continue
        argv = step[1]
        suffix = f"  # repeated every {WAIT_SECONDS} s until ACTIVE" if step[0] == "wait" else ""
        print(shlex.join(argv) + suffix, flush=True)
        if dry_run:
            continue
        if step[0] == "wait":
            wait_active(argv, gcloud)
        else:
            subprocess.run([gcloud, *argv[1:]], check=True)


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> Parser:
    common = Parser(add_help=False, allow_abbrev=False)
    common.add_argument("name", help="the TPU VM (or queued resource) name")
    common.add_argument("--zone", help="e.g. us-east5-a (required)")
    common.add_argument("--project", help="the Google Cloud project ID (required)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    slices = Parser(add_help=False, allow_abbrev=False)
    slices.add_argument("--slices", type=int, default=1,
                        help="number of slices (a multi-slice queued resource; nodes NAME-0, NAME-1, ...)")
    accel = Parser(add_help=False, allow_abbrev=False)
    accel.add_argument("--accelerator-type", help="e.g. v4-8, v5p-8, v5litepod-16, v6e-8 (required)")
    create = Parser(add_help=False, allow_abbrev=False)
    create.add_argument("--version", help="TPU software version (default: the family's, e.g. v2-alpha-tpuv5)")
    create.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, preemptible at any time")
    create.add_argument("--preemptible", action="store_true", help="preemptible VMs (not with --queued)")
    create.add_argument("--queued", action="store_true", help="create a queued resource (required for --slices > 1)")
    create.add_argument("--network", help="VPC network (default: the project's default network)")
    code = Parser(add_help=False, allow_abbrev=False)
    code.add_argument("--repo", help="git URL to clone on every worker")
    code.add_argument("--ref", default="main", help="branch or tag to clone (default: main)")
    code.add_argument("--source", help="a local checkout to copy instead of cloning")
    train = Parser(add_help=False, allow_abbrev=False)
    train.add_argument("--config", help="training config under configs/, e.g. configs/hunyuan_video_13b_lora.py")
    train.add_argument("--workdir", help="checkpoints and metrics; a gs:// path when there are several workers")

    parser = Parser(prog="tpu.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = {
        "create": ([common, slices, accel, create], "create a TPU VM slice or a queued resource"),
        "install": ([common, slices, code], "install the code and its dependencies on every worker"),
        "train": ([common, slices, accel, train], "start training on every worker (in the background)"),
        "logs": ([common, slices], "follow a worker's training log"),
        "stop": ([common, slices], "SIGTERM the training processes (they save a checkpoint and exit)"),
        "delete": ([common, slices], "delete the slice or queued resource"),
        "up": ([common, slices, accel, create, code, train], "create, install and train"),
    }
    for name, (parents, help_text) in commands.items():
        epilog = "Arguments --config.a.b=value pass through to the trainer." if name in ("train", "up") else None
        p = sub.add_parser(name, parents=parents, help=help_text, description=help_text, epilog=epilog,
                           allow_abbrev=False)
        if name == "logs":
            p.add_argument("--worker", type=int, default=0, help="worker to follow (default 0)")
            p.add_argument("--slice", type=int, default=0, help="slice to follow with --slices (default 0)")
        if name == "delete":
            p.add_argument("--queued", action="store_true", help="delete a queued resource (and its nodes)")
    return parser


PLANS = dict(create=plan_create, install=plan_install, train=plan_train, logs=plan_logs, stop=plan_stop,
             delete=plan_delete, up=plan_up)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command in ("train", "up"):
            args.overrides = extra
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        steps = PLANS[args.command](args)
        execute(steps, args.dry_run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: {shlex.join(['gcloud', *e.cmd[1:]])} exited with status {e.returncode}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
