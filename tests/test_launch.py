"""launch/tpu.py, run as a user runs it (a subprocess): the exact gcloud commands of each subcommand, printed by
--dry-run and received by a fake gcloud on PATH, and the rejections (exit status 2, one `error:` line, gcloud never
called)."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")
WHERE = ["--zone=us-east5-a", "--project=my-proj"]
REPO = "https://github.com/example/hyvideo_jax.git"
LORA = "configs/hunyuan_video_13b_lora.py"
TRAIN_FLAGS = [f"--config={LORA}", "--workdir=gs://my-bucket/run", "--config.train.init_from=gs://my-bucket/dit",
               "--config.data.path=gs://my-bucket/clips"]

SETUP = ("set -e; python3 -m pip install --user --quiet --upgrade uv; [ -x ~/hyvideo_venv/bin/python ] || "
         "python3 -m uv venv --python 3.12 --seed ~/hyvideo_venv; rm -rf ~/hyvideo_jax")
PIP = '~/hyvideo_venv/bin/python -m pip install -e "$HOME/hyvideo_jax[tpu]"'
INSTALL_GIT = f"{SETUP}; git clone --depth 1 --branch main {REPO} ~/hyvideo_jax; {PIP}"
INSTALL_TAR = (f"{SETUP}; mkdir -p ~/hyvideo_jax; tar -xzf ~/hyvideo_jax-src.tar.gz -C ~/hyvideo_jax; "
               f"rm -f ~/hyvideo_jax-src.tar.gz; {PIP}")
STOP = ('if [ -f ~/hyvideo_train.pid ] && kill -0 "$(cat ~/hyvideo_train.pid)" 2>/dev/null; then '
        'kill -TERM "$(cat ~/hyvideo_train.pid)" && echo "sent SIGTERM to hyvideo_jax.train on $(hostname)"; '
        'else echo "hyvideo_jax.train is not running on $(hostname)"; fi')


def train_command(trainer_args: str) -> str:
    """The remote script of `train`; LIBTPU_INIT_ARGS comes from the one table in tpu.py (checked below)."""
    return ('set -e; cd ~/hyvideo_jax; if [ -f ~/hyvideo_train.pid ] && kill -0 "$(cat ~/hyvideo_train.pid)" '
            '2>/dev/null; then echo "hyvideo_jax.train is already running on $(hostname)" >&2; exit 1; fi; '
            f'export LIBTPU_INIT_ARGS="{tpu.LIBTPU_INIT_ARGS}"; '
            f'nohup ~/hyvideo_venv/bin/python -m hyvideo_jax.train {trainer_args} >> ~/hyvideo_train.log 2>&1 '
            '< /dev/null & echo $! > ~/hyvideo_train.pid; '
            'echo "training started on $(hostname), log in ~/hyvideo_train.log"')


LORA_TRAIN = train_command(f"--config={LORA} --workdir=gs://my-bucket/run --config.train.init_from=gs://my-bucket/dit "
                           "--config.data.path=gs://my-bucket/clips")


def ssh(node, command, worker="all"):
    return ["compute", "tpus", "tpu-vm", "ssh", node, *WHERE, f"--worker={worker}", f"--command={command}"]


@pytest.fixture
def fake(tmp_path):
    """A gcloud on PATH that appends its arguments (a JSON line) to a log and succeeds; returns (env, calls)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud_calls.jsonl"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:\n"
                      "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    gcloud.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
               TMPDIR=str(tmp_path / "tmp"))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return env, calls


def launch(env, *args, python=(sys.executable,)):
    return subprocess.run([*python, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_libtpu_flags_table():
    assert tpu.LIBTPU_INIT_ARGS == " ".join(f"--{n}={v}" for n, v in tpu.LIBTPU_FLAGS)
    names = [n for n, _ in tpu.LIBTPU_FLAGS]
    assert len(set(names)) == len(names) and all(n.startswith("xla_") for n in names)
    assert "xla_tpu_enable_async_collective_fusion_multiple_steps" in names
    assert "xla_tpu_overlap_compute_collective_tc" in names and "xla_enable_async_all_gather" in names


def test_up_dry_run_prints_the_commands(fake):
    env, calls = fake
    result = launch(env, "up", "my-tpu", *WHERE, "--accelerator-type=v5p-8", f"--repo={REPO}", *TRAIN_FLAGS,
                    "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create my-tpu --zone=us-east5-a --project=my-proj --accelerator-type=v5p-8 "
        "--version=v2-alpha-tpuv5",
        "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --project=my-proj --worker=all "
        f"'--command={INSTALL_GIT}'",
        "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --project=my-proj --worker=all "
        f"'--command={LORA_TRAIN}'",
    ]
    assert calls() == []


def test_up_dry_run_queued_spot_v6e_multislice(fake):
    env, calls = fake
    result = launch(env, "up", "my-tpu", *WHERE, "--accelerator-type=v6e-8", "--queued", "--spot", "--slices=2",
                    f"--repo={REPO}", "--ref=v1.0", *TRAIN_FLAGS, "--config.mesh.dcn=(2,1,1,1)", "--dry-run")
    assert result.returncode == 0, result.stderr
    install = INSTALL_GIT.replace("--branch main", "--branch v1.0")
    train = train_command(f"--config={LORA} --workdir=gs://my-bucket/run --config.train.init_from=gs://my-bucket/dit "
                          "--config.data.path=gs://my-bucket/clips '--config.mesh.dcn=(2,1,1,1)'")
    train_quoted = train.replace("'", "'\"'\"'")   # shlex quoting of the single quotes inside --command=...
    assert result.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create my-tpu --node-count=2 --node-prefix=my-tpu --zone=us-east5-a "
        "--project=my-proj --accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e --spot",
        "gcloud compute tpus queued-resources describe my-tpu --zone=us-east5-a --project=my-proj "
        "'--format=value(state.state)'  # repeated every 30 s until ACTIVE",
        *[f"gcloud compute tpus tpu-vm ssh my-tpu-{i} --zone=us-east5-a --project=my-proj --worker=all "
          f"'--command={install}'" for i in range(2)],
        *[f"gcloud compute tpus tpu-vm ssh my-tpu-{i} --zone=us-east5-a --project=my-proj --worker=all "
          f"'--command={train_quoted}'" for i in range(2)],
    ]
    assert calls() == []


def run_in_order(env, calls, steps):
    """Run each (arguments, expected gcloud calls) step; after each, the fake has recorded exactly the calls so far."""
    expected = []
    for args, commands in steps:
        result = launch(env, *args)
        assert result.returncode == 0, (args, result.stderr)
        expected += commands
        assert calls() == expected, args


def test_subcommands_call_gcloud(fake):
    env, calls = fake
    steps = [
        (["create", "my-tpu", *WHERE, "--accelerator-type=v5p-8"],
         [["compute", "tpus", "tpu-vm", "create", "my-tpu", *WHERE, "--accelerator-type=v5p-8",
           "--version=v2-alpha-tpuv5"]]),
        (["create", "my-tpu", *WHERE, "--accelerator-type=v5litepod-16", "--preemptible"],
         [["compute", "tpus", "tpu-vm", "create", "my-tpu", *WHERE, "--accelerator-type=v5litepod-16",
           "--version=v2-alpha-tpuv5-lite", "--preemptible"]]),
        (["create", "my-tpu", *WHERE, "--accelerator-type=v4-8", "--queued", "--spot", "--version=v2-alpha-tpuv4"],
         [["compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu", *WHERE,
           "--accelerator-type=v4-8", "--runtime-version=v2-alpha-tpuv4", "--spot"]]),
        (["install", "my-tpu", *WHERE, f"--repo={REPO}"], [ssh("my-tpu", INSTALL_GIT)]),
        (["train", "my-tpu", *WHERE, "--accelerator-type=v5p-8", *TRAIN_FLAGS], [ssh("my-tpu", LORA_TRAIN)]),
        (["logs", "my-tpu", *WHERE], [ssh("my-tpu", "tail -n 200 -F ~/hyvideo_train.log", worker="0")]),
        (["logs", "my-tpu", *WHERE, "--worker=3"], [ssh("my-tpu", "tail -n 200 -F ~/hyvideo_train.log", worker="3")]),
        (["stop", "my-tpu", *WHERE], [ssh("my-tpu", STOP)]),
        (["delete", "my-tpu", *WHERE], [["compute", "tpus", "tpu-vm", "delete", "my-tpu", *WHERE, "--quiet"]]),
    ]
    run_in_order(env, calls, steps)


def test_multislice_queued_resource(fake):
    env, calls = fake
    steps = [
        (["create", "big", *WHERE, "--accelerator-type=v5p-16", "--queued", "--slices", "2"],
         [["compute", "tpus", "queued-resources", "create", "big", "--node-count=2", "--node-prefix=big", *WHERE,
           "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5"]]),
        (["install", "big", *WHERE, "--slices=2", f"--repo={REPO}"], [ssh("big-0", INSTALL_GIT),
                                                                     ssh("big-1", INSTALL_GIT)]),
        (["train", "big", *WHERE, "--slices=2", "--accelerator-type=v5p-16", f"--config={LORA}",
          "--workdir=gs://my-bucket/run", "--config.mesh.dcn=(2,1,1,1)"],
         [ssh(f"big-{i}", train_command(f"--config={LORA} --workdir=gs://my-bucket/run '--config.mesh.dcn=(2,1,1,1)'"))
          for i in range(2)]),
        (["logs", "big", *WHERE, "--slices=2", "--slice=1"],
         [ssh("big-1", "tail -n 200 -F ~/hyvideo_train.log", worker="0")]),
        (["stop", "big", *WHERE, "--slices=2"], [ssh("big-0", STOP), ssh("big-1", STOP)]),
        (["delete", "big", *WHERE, "--queued", "--slices=2"],
         [["compute", "tpus", "queued-resources", "delete", "big", *WHERE, "--force", "--quiet"]]),
    ]
    run_in_order(env, calls, steps)


def test_install_from_local_checkout(fake, tmp_path):
    env, calls = fake
    source = tmp_path / "checkout"
    for name, text in {"setup.py": "", "hyvideo_jax/__init__.py": "", ".gitignore": "ignored/\n",
                       "ignored/big.bin": "x"}.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    result = launch(env, "install", "my-tpu", *WHERE, f"--source={source}")
    assert result.returncode == 0, result.stderr
    tarball = str(tmp_path / "tmp" / "hyvideo_jax-src.tar.gz")
    assert calls() == [["compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:hyvideo_jax-src.tar.gz", *WHERE,
                        "--worker=all"], ssh("my-tpu", INSTALL_TAR)]
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "hyvideo_jax/__init__.py", "setup.py"]
    assert result.stdout.splitlines()[0] == f"# pack {source} into {tarball}"


def test_pack_without_git_skips_environments(tmp_path):
    source = tmp_path / "plain"
    for name in ("setup.py", "configs/a.py", ".venv/bin/python", "x/__pycache__/m.pyc", "p.egg-info/PKG-INFO"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("")
    tpu.pack(str(source), str(tmp_path / "out.tar.gz"))   # not a git work tree: git ls-files fails
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["configs/a.py", "setup.py"]


def test_train_without_the_package_prints_a_note(fake):
    """Python without site-packages (as on a laptop with only Python and gcloud): the launcher still works, and
    says what it could not check."""
    env, calls = fake
    result = launch(env, "train", "my-tpu", *WHERE, "--accelerator-type=v5p-8", *TRAIN_FLAGS, "--dry-run",
                    python=(sys.executable, "-S"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"note: {LORA} cannot be loaded here (")
    assert "check that the product of its mesh.dcn is 1 (--slices)" in result.stderr
    assert len(result.stdout.splitlines()) == 1 and calls() == []


FAMILIES = ("v4-N (N TensorCores, a multiple of 8 from 8 to 8192); v5p-N (N TensorCores, a multiple of 8 from 8 to "
            "12288); v5litepod-N (N chips in 1, 4, 8, 16, 32, 64, 128, 256); v6e-N (N chips in 1, 4, 8, 16, 32, 64, "
            "128, 256)")


@pytest.mark.parametrize("args,message", [
    (["create", "my-tpu", *WHERE, "--accelerator-type=v3-8"],
     f"--accelerator-type=v3-8 is not a known TPU type; the families are: {FAMILIES}"),
    (["up", "my-tpu", *WHERE, "--accelerator-type=tpu-8", f"--repo={REPO}", *TRAIN_FLAGS],
     f"--accelerator-type=tpu-8 is not a known TPU type; the families are: {FAMILIES}"),
    (["create", "my-tpu", *WHERE, "--accelerator-type=v6e-12"],
     "--accelerator-type=v6e-12: v6e slices come as v6e-N with N chips in 1, 4, 8, 16, 32, 64, 128, 256"),
    (["create", "my-tpu", "--project=my-proj", "--accelerator-type=v5p-8"],
     "--zone is required: the zone of the slice, e.g. --zone=us-east5-a"),
    (["delete", "my-tpu", "--zone=us-east5-a"],
     "--project is required: the Google Cloud project ID, e.g. --project=my-proj"),
    (["create", "My_TPU", *WHERE, "--accelerator-type=v5p-8"],
     "'My_TPU' is not a valid TPU name: lowercase letters, digits and hyphens, starting with a letter, not ending "
     "with a hyphen, at most 63 characters"),
    (["create", "my-tpu", *WHERE, "--accelerator-type=v5p-16", "--slices=2"],
     "--slices=2 needs --queued: several slices are created together as one queued resource"),
    (["up", "my-tpu", *WHERE, "--accelerator-type=v5p-16", "--slices=2", f"--repo={REPO}", *TRAIN_FLAGS],
     "--slices=2 needs --queued: several slices are created together as one queued resource"),
    (["train", "my-tpu", *WHERE, "--accelerator-type=v5p-16", f"--config={LORA}", "--workdir=/home/me/run"],
     "--workdir=/home/me/run is local to each worker, but v5p-16 x 1 slice(s) has 2 workers that must share one "
     "workdir: use a gs:// path"),
    (["up", "my-tpu", *WHERE, "--accelerator-type=v6e-16", f"--repo={REPO}", f"--config={LORA}", "--workdir=run"],
     "--workdir=run is local to each worker, but v6e-16 x 1 slice(s) has 4 workers that must share one workdir: "
     "use a gs:// path"),
    (["train", "my-tpu", *WHERE, "--accelerator-type=v5p-8", "--config=hyvideo_jax/train.py", "--workdir=run"],
     "--config=hyvideo_jax/train.py must be a training config under configs/, e.g. "
     "--config=configs/hunyuan_video_13b_lora.py"),
    (["train", "big", *WHERE, "--slices=2", "--accelerator-type=v5p-8", f"--config={LORA}", "--workdir=gs://b/r"],
     "mesh.dcn (1, 1, 1, 1) spans 1 slice(s) but --slices=2: set --config.mesh.dcn so its product is 2, e.g. "
     "(2,1,1,1)"),
    (["train", "my-tpu", *WHERE, "--accelerator-type=v5p-16", "--config=configs/tiny.py", "--workdir=gs://b/r"],
     "configs/tiny.py trains in one process, but the slice has 2 workers: add "
     "--config.train.initialize_distributed=True"),
    (["train", "my-tpu", *WHERE, "--accelerator-type=v5p-8", f"--config={LORA}", "--workdir=run", "--steps=3"],
     "unrecognized argument --steps=3: config overrides look like --config.train.num_steps=100"),
    (["install", "my-tpu", *WHERE], "install needs the code from exactly one place: --repo=URL (git clone of --ref) "
     "or --source=DIR (a local checkout, copied)"),
    (["create", "my-tpu", *WHERE, "--accelerator-type=v5p-8", "--queued", "--preemptible"],
     "--preemptible applies to TPU VMs created directly; queued resources take --spot"),
    (["delete", "big", *WHERE, "--slices=2"],
     "--slices=2 needs --queued: several slices are one queued resource, deleted with its nodes"),
    (["stop", "my-tpu", *WHERE, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_rejections(fake, args, message):
    env, calls = fake
    result = launch(env, *args)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"error: {message}\n", "")
    assert calls() == []
