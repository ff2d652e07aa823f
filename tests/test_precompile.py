"""runtime/precompile.py: on a machine without a model's decode kernels (a fresh `$TMPDIR`, where
MLX's CPU keeps the kernels it compiles), `runtime generate` and `chat` compile them in a child
process while decoding eagerly, and publish them into the machine's cache.

Each run is a real `python -m runtime` process with a TMPDIR of its own (MLX fixes its cache
directory at its first compilation in a process, so this test process cannot switch it)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from runtime import load
from runtime.kernels import TEMP_VARIABLES, compiled_kernel_names
from runtime.precompile import (
    LIST_PREFIX,
    OWNERS,
    compiled_here,
    publish,
    seed,
    signature,
    sweep,
    zero_weights,
)
from tests.runtime_helpers import demo_bundle

pytestmark = pytest.mark.filterwarnings("ignore::runtime.loader.TargetMismatchWarning")

PROMPT = "Beautiful is better than"
NOTE = "a background process compiles them"


def machine(tmpdir) -> dict:
    """This environment with `tmpdir` as the only temporary directory MLX looks at: a machine."""
    env = {k: v for k, v in os.environ.items() if k not in TEMP_VARIABLES}
    env["TMPDIR"] = str(tmpdir)
    return env


def run(*args, tmpdir, stdin=None):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True,
                          env=machine(tmpdir), input=stdin, timeout=300)


def fresh(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return d


def leftovers(tmpdir):
    """What a run must not leave: the child's private directory, half-copied files."""
    return [p for p in tmpdir.rglob("*") if p.name.startswith(("mlx-prepared-compile-", ".mlx-prepared-"))]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.mktemp("precompile"))


@pytest.fixture(scope="module")
def foreground(bundle, tmp_path_factory):
    """A cold run that compiles in its own process (the way without a child): its text, its kernels."""
    tmp = tmp_path_factory.mktemp("foreground")
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", "--no-background-compile", tmpdir=tmp)
    assert r.returncode == 0 and NOTE not in r.stderr, r.stderr
    names = compiled_kernel_names(tmp)
    assert len(names) >= 5, names
    return r.stdout, names


def test_a_cold_run_compiles_in_the_background_and_the_next_run_starts_compiled(bundle, foreground, tmp_path):
    text, names = foreground
    tmp = fresh(tmp_path, "cold")
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", tmpdir=tmp)
    assert r.returncode == 0, r.stderr
    assert NOTE in r.stderr and "failed" not in r.stderr, r.stderr
    assert r.stdout == text  # eager then compiled steps: the same greedy text (bit-identical passes on the CPU)
    # every kernel the step needs, compiled by the child over zero weights, is in this machine's cache
    assert compiled_kernel_names(tmp) == names
    assert not leftovers(tmp)
    listings = list(tmp.rglob(f"{LIST_PREFIX}*.json"))
    assert len(listings) == 1 and all(os.path.isfile(p) for p in json.loads(listings[0].read_text()))
    before = sorted(p.name for p in tmp.rglob("*"))
    again = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", tmpdir=tmp)
    assert again.returncode == 0 and again.stdout == text
    assert NOTE not in again.stderr and "compiling" not in again.stderr, again.stderr
    assert sorted(p.name for p in tmp.rglob("*")) == before  # nothing compiled, nothing published


def test_a_removed_kernel_makes_the_next_run_compile_again(bundle, foreground, tmp_path):
    tmp = fresh(tmp_path, "partial")
    assert run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "4", tmpdir=tmp).returncode == 0
    listing = next(tmp.rglob(f"{LIST_PREFIX}*.json"))
    os.remove(json.loads(listing.read_text())[0])  # e.g. a temp cleaner took one
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", tmpdir=tmp)
    assert r.returncode == 0 and NOTE in r.stderr and r.stdout == foreground[0], r.stderr
    assert compiled_kernel_names(tmp) == foreground[1]


def test_kernels_already_here_are_not_compiled_again(bundle, foreground, tmp_path):
    """A machine with the kernels but no list of them (it ran the model the old way, or its list
    was lost): the child finds them, linked from the caches, and compiles nothing."""
    tmp = fresh(tmp_path, "seeded")
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "4", "--no-background-compile", tmpdir=tmp)
    assert r.returncode == 0 and not list(tmp.rglob(f"{LIST_PREFIX}*"))
    before = {p: p.stat().st_mtime_ns for p in tmp.rglob("*") if p.is_file()}
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", tmpdir=tmp)
    assert r.returncode == 0 and NOTE in r.stderr and r.stdout == foreground[0], r.stderr
    after = {p: p.stat().st_mtime_ns for p in tmp.rglob("*") if p.is_file() and not p.name.startswith(LIST_PREFIX)}
    assert after == before  # not one kernel rewritten
    listing = next(tmp.rglob(f"{LIST_PREFIX}*.json"))
    assert set(json.loads(listing.read_text())) == {str(p) for p in tmp.rglob("lib*.so")}  # the seeded ones
    assert not leftovers(tmp)


def test_chat_compiles_in_the_background_too(bundle, foreground, tmp_path):
    tmp = fresh(tmp_path, "chat")
    with_child = run("chat", str(bundle), "--max-tokens", "12", tmpdir=tmp, stdin="hello\nagain\n")
    without = run("chat", str(bundle), "--max-tokens", "12", "--no-background-compile",
                  tmpdir=fresh(tmp_path, "chat-fg"), stdin="hello\nagain\n")
    assert with_child.returncode == 0 and NOTE in with_child.stderr, with_child.stderr
    assert with_child.stdout == without.stdout and with_child.stdout.strip()
    assert [line.startswith("prompt: ") for line in with_child.stderr.splitlines()].count(True) == 2  # two turns
    assert compiled_kernel_names(tmp) == foreground[1] and not leftovers(tmp)


def test_a_failed_child_leaves_generation_to_compile_here(bundle, foreground, tmp_path):
    """The bundle is gone by the time the child loads it (moved while the parent runs): the child
    fails, the parent says so and compiles at its first compiled step, the text is the same."""
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    script = (
        "import shutil, sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from runtime import load, generate, precompile\n"
        f"model, tok = load({str(moved)!r})\n"
        f"shutil.rmtree({str(moved)!r})\n"
        "job = precompile.start(model)\n"
        "job.finish()\n"
        "assert job.failure and job.published is None, (job.failure, job.published)\n"
        "print(job.failure, file=sys.stderr)\n"
        f"print(generate(model, tok, {PROMPT!r}, max_tokens=24), end='\\n')\n"
    )
    tmp = fresh(tmp_path, "failed")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=machine(tmp))
    assert r.returncode == 0, r.stderr
    assert "exit 1" in r.stderr and str(moved) in r.stderr, r.stderr  # the child's last line: what it could not read
    assert r.stdout == foreground[0]
    assert compiled_kernel_names(tmp) == foreground[1]  # compiled here, at the first compiled step
    assert not leftovers(tmp) and not list(tmp.rglob(f"{LIST_PREFIX}*"))


def test_ctrl_c_while_the_child_compiles_leaves_the_cache_whole(bundle, tmp_path):
    tmp = fresh(tmp_path, "interrupted")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "chat", str(bundle)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=machine(tmp),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp) and time.monotonic() < deadline:  # the child's directory: it has started
            time.sleep(0.05)
        assert leftovers(tmp), "no child started"
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert not leftovers(tmp)
    for listing in tmp.rglob(f"{LIST_PREFIX}*.json"):  # published before the signal, if at all: whole
        assert all(os.path.isfile(p) for p in json.loads(listing.read_text()))


def test_publish_copies_each_file_once_and_lists_the_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "machine"))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    (tmp_path / "machine").mkdir()
    private = tmp_path / "child"
    cpu, ptx = private / "mlx" / mx.__version__ / "cpu", private / "ptx"
    (ptx / "long").mkdir(parents=True)
    cpu.mkdir(parents=True)
    (cpu / "libK_contiguous.so").write_bytes(b"so")
    (cpu / "K_contiguous.cpp").write_text("src")
    (ptx / "long" / "M.ptx").write_text("ptx")
    (ptx / "long" / "M.txt").write_text("names")
    published = publish(private, "abc")
    machine = tmp_path / "machine" / "mlx" / mx.__version__
    kernels = [machine / "cpu" / "libK_contiguous.so", machine / "ptx" / "long" / "M.ptx"]
    assert sorted(published) == sorted(map(str, kernels))
    assert (machine / "ptx" / "long" / "M.txt").read_text() == "names"
    assert (machine / "cpu" / "K_contiguous.cpp").read_text() == "src"
    assert compiled_here("abc") and not compiled_here("abd")
    assert not [p for p in tmp_path.rglob(".mlx-prepared-*")]
    os.remove(machine / "ptx" / "long" / "M.ptx")
    assert not compiled_here("abc")


def test_publish_makes_the_lists_directory(tmp_path, monkeypatch):
    """CUDA's kernels live in MLX_PTX_CACHE_DIR; nothing is compiled for the CPU, so nothing makes
    `$TMPDIR/mlx/<version>`, where the list goes."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "machine"))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "ptx-cache"))
    (tmp_path / "machine").mkdir()
    ptx = tmp_path / "child" / "ptx"
    ptx.mkdir(parents=True)
    (ptx / "M.txt").write_text("names")
    (ptx / "M.ptx").write_text("ptx")
    assert publish(tmp_path / "child", "cuda") == [str(tmp_path / "ptx-cache" / "M.ptx")]
    assert compiled_here("cuda")


def test_the_signature_follows_what_names_kernels(bundle):
    model, _ = load(bundle)
    same, _ = load(bundle)
    assert signature(model) == signature(same)
    zero_weights(same)  # values do not name kernels
    assert signature(model) == signature(same)
    first = next(iter(same.parameters()["model"]["language_model"]["layers"][0]["input_layernorm"].values()))
    same.model.language_model.layers[0].input_layernorm.weight = first.astype(mx.float16)
    assert signature(model) != signature(same)  # a dtype does


def test_a_killed_parents_child_directory_is_swept_at_the_next_start(tmp_path, monkeypatch):
    """SIGKILL leaves the child's directory behind; the next start removes it, and only it: not
    one whose processes live, not one without the record, not anything else in TMPDIR."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    dirs = {name: tmp_path / name for name in ("mlx-prepared-compile-dead", "mlx-prepared-compile-live",
                                               "mlx-prepared-compile-norecord", "someone-elses")}
    for d in dirs.values():
        (d / "ptx").mkdir(parents=True)
        (d / "ptx" / "K.ptx").write_text("x")
    (dirs["mlx-prepared-compile-dead"] / OWNERS).write_text(json.dumps([dead, dead]))
    (dirs["mlx-prepared-compile-live"] / OWNERS).write_text(json.dumps([dead, os.getpid()]))
    (dirs["someone-elses"] / OWNERS).write_text(json.dumps([dead, dead]))
    assert sweep() == [dirs["mlx-prepared-compile-dead"]]
    assert [n for n, d in dirs.items() if d.exists()] == ["mlx-prepared-compile-live", "mlx-prepared-compile-norecord",
                                                          "someone-elses"]


def test_a_sigkilled_run_leaves_a_directory_the_next_run_removes(bundle, foreground, tmp_path):
    tmp = fresh(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "chat", str(bundle)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=machine(tmp),
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp.glob("mlx-prepared-compile-*/" + OWNERS)) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its child, nothing cleaned up
    proc.wait(timeout=30)
    time.sleep(0.5)
    assert leftovers(tmp)
    r = run("generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "24", tmpdir=tmp)
    assert r.returncode == 0 and r.stdout == foreground[0], r.stderr
    assert not leftovers(tmp)


def test_the_python_api_opts_in(bundle, foreground, tmp_path):
    """`runtime.compile_in_background(model)`: the same child for an API user, who owns it."""
    script = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import runtime\n"
        "from runtime.precompile import compiled_here, signature\n"
        f"model, tok = runtime.load({str(bundle)!r})\n"
        "job = runtime.compile_in_background(model)\n"
        "assert job is not None and runtime.compile_in_background(model) is job\n"
        f"text = runtime.generate(model, tok, {PROMPT!r}, max_tokens=24)\n"
        "job.finish()\n"
        "assert job.failure is None and job.published and compiled_here(signature(model)), job.failure\n"
        "assert runtime.compile_in_background(runtime.load(sys.argv[1])[0]) is None  # warm now\n"
        "print(text)\n"
    )
    tmp = fresh(tmp_path, "api")
    r = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True, text=True, timeout=300,
                       env=machine(tmp))
    assert r.returncode == 0, r.stderr
    assert r.stdout == foreground[0]
    assert compiled_kernel_names(tmp) == foreground[1] and not leftovers(tmp)


@pytest.mark.parametrize("model", [None, "bundle-path", 3])
def test_compile_in_background_refuses_what_is_not_a_model(model):
    import runtime
    from runtime.inputs import BadType

    with pytest.raises(BadType, match="model must be a loaded model"):
        runtime.compile_in_background(model)


def test_a_process_that_exits_without_finishing_leaves_no_child(bundle, tmp_path):
    script = (
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import runtime\n"
        f"model, tok = runtime.load({str(bundle)!r})\n"
        "job = runtime.compile_in_background(model)\n"
        "print(job.child.pid)\n"
    )
    tmp = fresh(tmp_path, "exit")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=machine(tmp))
    assert r.returncode == 0, r.stderr
    child = int(r.stdout)
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split(")")[-1].split()[0] == "Z"
    assert not leftovers(tmp)


def test_seeding_where_the_ptx_cache_is_tmpdir_itself(tmp_path, monkeypatch):
    """MLX_PTX_CACHE_DIR may be TMPDIR (bench_coldstart.py sets both to one directory), where the
    child's own directory lives too: seeding links the kernel files only, not the child's own
    files (which it would be adding to as it walks), not other files in TMPDIR."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    (tmp_path / "K.ptx").write_text("ptx")
    (tmp_path / "K.txt").write_text("names")
    (tmp_path / "notes.doc").write_text("a user's file")
    private = tmp_path / "mlx-prepared-compile-x"
    (private / "ptx").mkdir(parents=True)
    (private / "ptx" / "Own.ptx").write_text("being written")
    seed(private)
    linked = sorted(str(p.relative_to(private)) for p in private.rglob("*") if p.is_symlink())
    assert linked == ["ptx/K.ptx", "ptx/K.txt"]
    assert publish(private, "same-dir") == sorted([str(tmp_path / "K.ptx"), str(tmp_path / "Own.ptx")])
    assert (tmp_path / "Own.ptx").read_text() == "being written" and (tmp_path / "notes.doc").exists()


TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)  # the syscall's number (Linux)


@pytest.mark.skipif(not sys.platform.startswith("linux") or TGKILL is None, reason="tgkill, /proc: Linux")
def test_waiting_for_the_child_still_hears_a_signal_handled_on_another_thread(tmp_path):
    """`generate` and `chat` end by waiting for the background child (`finish()`). Python runs a
    signal's handler on the main thread, between bytecodes; the kernel may hand a process's
    signal to any thread (MLX has several), and a main thread blocked in a wait with no timeout
    then never gets there before the child ends: minutes on a GPU, for a SIGTERM from a process
    manager. Here a real BackgroundCompile whose child is a 60 s sleep (the object made without
    its constructor, which would start a real compilation; its lock and child are what `finish`
    uses) is waited for while SIGUSR1 goes to another thread: the handler must run at once."""
    script = (
        "import ctypes, os, signal, subprocess, sys, threading, time\n"
        "from runtime.precompile import BackgroundCompile\n"
        "job = BackgroundCompile.__new__(BackgroundCompile)\n"
        "job._lock = threading.Lock()\n"
        "job.child = subprocess.Popen(['sleep', '60'])\n"
        "class Heard(Exception): pass\n"
        "def heard(*_): raise Heard\n"
        "signal.signal(signal.SIGUSR1, heard)\n"
        "other = threading.Thread(target=time.sleep, args=(30,), daemon=True); other.start()\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def send():\n"
        "    time.sleep(1)\n"
        f"    assert libc.syscall({TGKILL}, os.getpid(), other.native_id, signal.SIGUSR1) == 0\n"
        "threading.Thread(target=send, daemon=True).start()\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    job.finish()\n"
        "    print('not heard')\n"
        "except Heard:\n"
        "    print(f'heard after {time.monotonic() - t0:.2f} s')\n"
        "finally:\n"
        "    job.child.kill(); job.child.wait()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=machine(fresh(tmp_path, "signal")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("heard after "), r.stdout
    assert float(r.stdout.split()[2]) < 5, r.stdout
