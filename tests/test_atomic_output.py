"""Outputs appear whole or not at all, whatever stops the writer: a PEFT folder is replaced as a whole,
readers see one version, a killed writer's temp files do not stay, creating never replaces, a failed
write removes the parent folders it made, and an operating-system error names the destination."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import adapterpack
import adapterpack.convert as convert_mod
from adapterpack import Adapter, Module
from adapterpack.container.writer import write_apack
from adapterpack.convert import convert
from adapterpack.errors import ConversionError, OutputExistsError
from adapterpack.interop.kohya import write_kohya
from adapterpack.interop.peft import write_peft
from tests.apack_builders import compressible_adapter, small_adapter

ROOT = Path(__file__).resolve().parents[1]
NAME = "model.layers.0.self_attn.q_proj"
#: Audit events of the file-system steps a writer takes (the kill or failure is injected before one of them).
FS_EVENTS = frozenset(
    "open os.rename os.link os.remove os.rmdir os.mkdir os.chmod os.symlink os.scandir os.listdir shutil.rmtree "
    "shutil.copyfile shutil.copytree tempfile.mkstemp tempfile.mkdtemp ctypes.call_function".split()
)


def version(value: float, alpha: float) -> Adapter:
    """One lora module with B filled with ``value`` and ``alpha``: a read tells which version by both files."""
    a = np.ones((4, 16), np.float32)
    b = np.full((8, 4), value, np.float32)
    m = Module(NAME, "lora", (8, 16), {"rank": 4, "alpha": alpha}, {"A": a, "B": b})
    return Adapter(base_model="toy/base", modules={NAME: m})


OLD, NEW = version(1.0, 8.0), version(2.0, 16.0)


def which(folder: Path) -> tuple[float, float]:
    """(alpha from adapter_config.json, a B value from the weights) as adapterpack reads the folder."""
    with adapterpack.open(folder) as ad:
        m = ad.module(NAME)
        return float(m.params["alpha"]), float(np.asarray(m.array("B"))[0, 0])


def snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """Every file under a folder (relative name → bytes), a file's bytes, or None when absent."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def in_child(action: Callable[[], object], step: int, kill: bool) -> int:
    """Run ``action`` in a forked child that is SIGKILLed (``kill``) or gets an OSError just before its
    ``step``-th file-system step; the child's exit status (0: it finished before that step)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            seen = [0]

            def hook(event: str, args: tuple[object, ...]) -> None:
                if event in FS_EVENTS:
                    seen[0] += 1
                    if seen[0] == step:
                        if kill:
                            os.kill(os.getpid(), signal.SIGKILL)
                        raise OSError(errno.EIO, "injected failure")

            sys.addaudithook(hook)
            action()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def every_step(action: Callable[[], object], reset: Callable[[], None], check: Callable[[], None], kill: bool) -> int:
    """Stop ``action`` before each of its file-system steps in turn (``reset`` first, ``check`` after); the steps."""
    for step in range(1, 400):
        reset()
        status = in_child(action, step, kill)
        check()
        if status == 0:
            return step - 1
    raise AssertionError("the writer never finished")


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "error"])
def test_peft_folder_replaced_as_a_whole_at_every_step(tmp_path: Path, kill: bool) -> None:
    """`convert --to peft --force` onto a folder with other files, stopped before any step: the folder is the
    old one or the new one, bit for bit, never new weights with the old config; the next write leaves
    nothing beside it."""
    src = tmp_path / "new.apack"
    write_apack(src, NEW)
    work = tmp_path / "work"
    dst = work / "peft"
    write_peft(OLD, dst)
    (dst / "README.md").write_text("model card")
    (dst / "checkpoint-10").mkdir()
    (dst / "checkpoint-10" / "state.json").write_text("{}")
    old = snapshot(dst)
    write_peft(NEW, dst)
    new = snapshot(dst)
    assert new != old and set(new) == set(old)  # type: ignore[arg-type]

    def reset() -> None:
        write_peft(OLD, dst)  # also removes what a killed writer left
        assert listing(work) == ["peft"] and snapshot(dst) == old

    def check() -> None:
        assert snapshot(dst) in (old, new)
        assert which(dst) in ((8.0, 1.0), (16.0, 2.0))

    steps = every_step(lambda: convert(src, dst, to="peft", force=True), reset, check, kill)
    assert steps > 3
    convert(src, dst, to="peft", force=True)
    assert snapshot(dst) == new and listing(work) == ["peft"]


def test_replacing_a_file_at_every_step(tmp_path: Path) -> None:
    """A killed `--force` write of a file leaves the old file or the new one, and any temp file it left is
    removed by the next write to that destination."""
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out.apack"
    write_apack(dst, NEW)
    new = dst.read_bytes()
    write_apack(dst, OLD)
    old = dst.read_bytes()

    def reset() -> None:
        write_apack(dst, OLD)
        assert listing(work) == ["out.apack"] and dst.read_bytes() == old

    def check() -> None:
        assert snapshot(dst) in (old, new)

    every_step(lambda: write_apack(dst, NEW), reset, check, kill=True)


@pytest.mark.skipif(not (hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")), reason="needs O_TMPFILE")
def test_a_killed_writer_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    """Killed before any step, a writer creating a file leaves no temp file at all: the complete file or nothing."""
    want_dir = tmp_path / "want"
    want = write_kohya(NEW, want_dir / "x.safetensors").read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "lora.safetensors"

    def reset() -> None:
        dst.unlink(missing_ok=True)

    def check() -> None:
        assert listing(work) in ([], ["lora.safetensors"])
        assert snapshot(dst) in (None, want)

    every_step(lambda: write_kohya(NEW, dst), reset, check, kill=True)


def test_a_killed_writer_of_a_new_folder_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "peft"
    write_peft(NEW, tmp_path / "want")
    want = snapshot(tmp_path / "want")

    def reset() -> None:
        write_peft(NEW, dst)  # removes a dead writer's temp folder
        assert listing(work) == ["peft"]
        shutil.rmtree(dst)

    def check() -> None:
        assert snapshot(dst) in (None, want)

    every_step(lambda: write_peft(NEW, dst), reset, check, kill=True)


def test_a_reader_sees_one_version_while_the_folder_is_swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer replacing the folder after the reader read the config: the reader still gets the old
    weights with it (both files come from one version of the folder)."""
    import adapterpack.interop.peft as peft

    dst = tmp_path / "peft"
    write_peft(OLD, dst)
    real = peft.read_config

    def then_replace(*args: object) -> object:
        cfg = real(*args)  # type: ignore[arg-type]
        write_peft(NEW, dst)
        return cfg

    monkeypatch.setattr(peft, "read_config", then_replace)
    assert which(dst) == (8.0, 1.0)
    monkeypatch.undo()
    assert which(dst) == (16.0, 2.0) and listing(tmp_path) == ["peft"]


def test_a_reader_whose_folder_was_swapped_out_and_removed_opens_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader opened the old folder, then a writer swapped the new one in and removed the old one before
    the reader opened its files: it opens the folder again and reads the new version, without an error."""
    dst = tmp_path / "peft"
    write_peft(OLD, dst)
    real = adapterpack.atomic._open_regular
    calls = []

    def swap_first(name: str, dir_fd: int | None) -> int | None:
        if not calls:
            write_peft(NEW, dst)
        calls.append(name)
        return real(name, dir_fd)

    monkeypatch.setattr(adapterpack.atomic, "_open_regular", swap_first)
    assert which(dst) == (16.0, 2.0)
    assert len(calls) == 6  # three names in the removed folder (none there), three in the new one


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from adapterpack import Adapter, Module
from adapterpack.interop.peft import write_peft
name, dst, started, stop = "{name}", Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def version(value, alpha):
    factors = {{"A": np.ones((4, 16), np.float32), "B": np.full((8, 4), value, np.float32)}}
    m = Module(name, "lora", (8, 16), {{"rank": 4, "alpha": alpha}}, factors)
    return Adapter(base_model="toy/base", modules={{name: m}})
pair = [version(2.0, 16.0), version(1.0, 8.0)]
end = time.monotonic() + 30
i = 0
while not stop.exists() and time.monotonic() < end:
    write_peft(pair[i % 2], dst)
    i += 1
    started.touch()
print(i)
"""


def test_concurrent_reads_never_see_a_mix(tmp_path: Path) -> None:
    """A writer replacing the folder in a loop (another process) while this one reads it with adapterpack:
    every read is the old pair or the new pair (about 2 s)."""
    dst, started, stop = tmp_path / "peft", tmp_path / "started", tmp_path / "stop"
    write_peft(OLD, dst)
    args = [sys.executable, "-c", WRITER.format(name=NAME), str(dst), str(started), str(stop)]
    writer = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seen: dict[tuple[float, float], int] = {}
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pair = which(dst)
            seen[pair] = seen.get(pair, 0) + 1
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and int(out) > 10
    assert set(seen) == {(8.0, 1.0), (16.0, 2.0)}, seen  # both versions read, nothing else
    assert listing(tmp_path) == ["peft", "started", "stop"]


@pytest.mark.parametrize("to, name", [("apack", "out.apack"), ("kohya", "out.safetensors"), ("peft", "out")])
def test_of_two_creates_one_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str, name: str) -> None:
    """Two converts to one new path without --force: the one that finds the path taken when it writes
    (a rival created it after the first check) gets OutputExistsError and the rival's output stays."""
    src_old, src_new = tmp_path / "old.apack", tmp_path / "new.apack"
    write_apack(src_old, OLD)
    write_apack(src_new, NEW)
    dst = tmp_path / name
    real = convert_mod.load_source

    def rival_first(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(convert_mod, "load_source", real)
        convert(src_new, dst, to=to)  # the rival passes the same check and writes first
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_mod, "load_source", rival_first)
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(src_old, dst, to=to)
    monkeypatch.undo()
    with adapterpack.open(dst) as ad:
        assert float(np.asarray(ad.module(NAME).array("B"))[0, 0]) == 2.0
    assert listing(tmp_path) == sorted(["new.apack", name, "old.apack"])


def test_a_failed_convert_leaves_no_new_parent_folder(tmp_path: Path) -> None:
    src = tmp_path / "in.apack"
    write_apack(src, small_adapter())  # holds a pass-through tensor a kohya file cannot carry
    with pytest.raises(ConversionError, match="drop-tensors"):
        convert(src, tmp_path / "a" / "b" / "out.safetensors", to="kohya")
    assert listing(tmp_path) == ["in.apack"]
    (tmp_path / "a").mkdir()  # a folder that was there before stays
    with pytest.raises(ConversionError, match="drop-tensors"):
        convert(src, tmp_path / "a" / "b" / "out.safetensors", to="kohya")
    assert listing(tmp_path) == ["a", "in.apack"] and listing(tmp_path / "a") == []


@pytest.mark.parametrize("to, name", [("apack", "out.apack"), ("peft", "out")])
def test_disk_full_names_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str, name: str) -> None:
    """ENOSPC from the file system: OutputWriteError (also an OSError) naming the output, the old output
    intact, no temp file and no parent folder left."""
    from adapterpack.errors import OutputWriteError

    src = tmp_path / "in.apack"
    write_apack(src, NEW)
    old = tmp_path / "old" / name
    convert(src, old, to=to)
    before = snapshot(old)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for dst in (tmp_path / "new" / "deeper" / name, old):
        with pytest.raises(OutputWriteError) as e:
            convert(src, dst, to=to, force=True)
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
        assert str(e.value) == f"cannot write {dst}: No space left on device"
    assert listing(tmp_path) == ["in.apack", "old"] and listing(tmp_path / "old") == [name]
    assert snapshot(old) == before


def test_cli_write_error_is_one_line_naming_the_path(tmp_path: Path) -> None:
    """A real write failure (the file-size limit, EFBIG, as a full disk would give ENOSPC) in `convert`:
    one line naming the destination, exit status 1, nothing left."""
    import resource

    src = tmp_path / "in.apack"
    write_apack(src, compressible_adapter(), codec="raw")
    dst = tmp_path / "out" / "copy.apack"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    r = subprocess.run(
        [sys.executable, "-m", "adapterpack", "convert", str(src), str(dst), "--codec", "raw"],
        cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr == f"adapterpack: cannot write {dst}: File too large\n"
    assert listing(tmp_path) == ["in.apack"]


def test_without_renameat2_o_tmpfile_or_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallbacks (rename aside, named temp files, check then rename) still replace whole folders, carry
    the other files over, refuse to replace without overwrite and leave nothing behind."""
    monkeypatch.setattr(adapterpack.atomic, "_renameat2_fn", lambda: None)
    monkeypatch.setattr(adapterpack.atomic, "_TMPFILE", False)
    real_link = os.link

    def no_links(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    dst = tmp_path / "peft"
    write_peft(OLD, dst, overwrite=False)
    (dst / "README.md").write_text("card")
    write_peft(NEW, dst)
    assert which(dst) == (16.0, 2.0) and (dst / "README.md").read_text() == "card"
    with pytest.raises(OutputExistsError, match="already exists"):
        write_peft(OLD, dst, overwrite=False)
    monkeypatch.setattr(os, "link", no_links)
    write_kohya(NEW, tmp_path / "k.safetensors", overwrite=False)
    with pytest.raises(OutputExistsError, match="already exists"):
        write_kohya(OLD, tmp_path / "k.safetensors", overwrite=False)
    monkeypatch.setattr(os, "link", real_link)
    assert which(dst) == (16.0, 2.0) and listing(tmp_path) == ["k.safetensors", "peft"]
    assert listing(dst) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_link_to_a_folder_keeps_pointing_at_the_replaced_folder(tmp_path: Path) -> None:
    write_peft(OLD, tmp_path / "run-1")
    (tmp_path / "latest").symlink_to("run-1")
    write_peft(NEW, tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and which(tmp_path / "run-1") == (16.0, 2.0)
    assert listing(tmp_path) == ["latest", "run-1"]


def test_only_a_dead_writers_temp_files_are_removed(tmp_path: Path) -> None:
    """A temp file of a live writer (or of another host) stays; of a dead writer on this host, the next
    write to the same destination removes it."""
    from adapterpack.atomic import _HOST

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    other_host = "0" * 8 if _HOST != "0" * 8 else "1" * 8
    names = [
        f".out.apack.{_HOST}-{dead}.0123abcd.tmp",  # removed
        f".out.apack.{_HOST}-{os.getppid()}.0123abcd.tmp",  # alive
        f".out.apack.{other_host}-{dead}.0123abcd.tmp",  # another host's
        f".other.{_HOST}-{dead}.0123abcd.tmp",  # another destination's
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"partial")
    write_apack(tmp_path / "out.apack", OLD)
    assert listing(tmp_path) == sorted(["out.apack", *names[1:]])


def test_an_input_error_inside_a_write_keeps_its_own_path(tmp_path: Path) -> None:
    """An OSError the writer's own code raises about another file (an input) is not renamed to the output."""
    from adapterpack.atomic import atomic_file

    with pytest.raises(FileNotFoundError) as e, atomic_file(tmp_path / "out.bin") as f:
        f.write(b"x")
        (tmp_path / "missing-input").read_bytes()
    assert e.value.filename == str(tmp_path / "missing-input") and listing(tmp_path) == []
