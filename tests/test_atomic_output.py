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
import adapterpack.ops.convert as convert_mod
from adapterpack import Adapter, Module
from adapterpack.container.writer import write_apack
from adapterpack.errors import ConversionError, InputError, OutputExistsError
from adapterpack.formats.kohya import write_kohya
from adapterpack.formats.peft import read_peft, write_peft
from adapterpack.ops.convert import convert
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
    ``step``-th file-system step; the child's exit status (0: it finished before that step; 2: it finished
    despite the error, which it ignored)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        seen = [0]
        try:

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
        os._exit(0 if seen[0] < step else 2)
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
    import adapterpack.formats.peft as peft

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

    def swap_first(folder: Path, name: str, dir_fd: int | None) -> int | None:
        if not calls:
            write_peft(NEW, dst)
        calls.append(name)
        return real(folder, name, dir_fd)

    monkeypatch.setattr(adapterpack.atomic, "_open_regular", swap_first)
    assert which(dst) == (16.0, 2.0)
    assert len(calls) == 8  # four names (config, weights, .bin, README.md) in the removed folder (none there), four in the new one


WRITER = """
import os, sys, time
from pathlib import Path
import numpy as np
from adapterpack import Adapter, Module
from adapterpack.formats.peft import read_peft, write_peft
name, dst, started, stop = "{name}", Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def version(value, alpha):
    factors = {{"A": np.ones((4, 16), np.float32), "B": np.full((8, 4), value, np.float32)}}
    m = Module(name, "lora", (8, 16), {{"rank": 4, "alpha": alpha}}, factors)
    return Adapter(base_model="toy/base", modules={{name: m}})
pair = [version(2.0, 16.0), version(1.0, 8.0)]
if len(sys.argv) > 4:  # in place: the working directory cannot be swapped
    os.chdir(dst)
    dst = Path(".")
end = time.monotonic() + 90
i = 0
while not stop.exists() and time.monotonic() < end:
    write_peft(pair[i % 2], dst)
    i += 1
    started.write_text(str(i))
print(i)
"""


def swaps(started: Path) -> int:
    """How many folders the writer has written (0 while it rewrites its count)."""
    try:
        return int(started.read_text())
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("in_place", [False, True], ids=["swapped", "in-place"])
def test_concurrent_reads_never_see_a_mix(tmp_path: Path, in_place: bool) -> None:
    """A writer replacing the folder in a loop (another process; in place: into its working directory)
    while this one reads it with adapterpack, until the writer wrote 20 folders and both versions were read:
    every read is the old pair or the new pair (in place, a read may also be refused while the config is
    moved aside), never a mix."""
    dst, started, stop = tmp_path / "peft", tmp_path / "started", tmp_path / "stop"
    write_peft(OLD, dst)
    args = [sys.executable, "-c", WRITER.format(name=NAME), str(dst), str(started), str(stop), *(["in-place"] if in_place else [])]
    writer = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seen: dict[tuple[float, float] | str, int] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (swaps(started) >= 20 and {(8.0, 1.0), (16.0, 2.0)} <= set(seen)):
            try:
                pair: tuple[float, float] | str = which(dst)
            except InputError as e:  # the config moved aside, or moving too often for a reader to pin one version
                assert in_place and ("no adapter_config.json" in str(e) or "kept changing" in str(e)), e
                pair = "refused"
            seen[pair] = seen.get(pair, 0) + 1
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and int(out) >= 20
    assert {(8.0, 1.0), (16.0, 2.0)} <= set(seen) <= {(8.0, 1.0), (16.0, 2.0), "refused"}, seen  # nothing else
    assert listing(tmp_path) == ["peft", "started", "stop"]
    assert listing(dst) == ["adapter_config.json", "adapter_model.safetensors"]


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


# --- folders that cannot be swapped: filled in place --------------------------------------------


def with_card(dst: Path, ad: Adapter) -> None:
    write_peft(ad, dst)
    (dst / "README.md").write_text("model card")


def test_writing_into_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`write_peft(ad, ".")` (str or Path) inside an existing PEFT folder: written in place, the other files kept,
    nothing left beside or inside it, and the process still in that folder (not in a removed old one)."""
    dst = tmp_path / "peft"
    with_card(dst, OLD)
    ino = dst.stat().st_ino
    monkeypatch.chdir(dst)
    for ad, dot, want in ((NEW, ".", (16.0, 2.0)), (OLD, Path("."), (8.0, 1.0))):
        write_peft(ad, dot)
        assert which(dst) == want and os.stat(".").st_ino == ino == dst.stat().st_ino
        assert listing(dst) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert listing(tmp_path) == ["peft"] and (dst / "README.md").read_text() == "model card"
    with pytest.raises(OutputExistsError, match="already exists"):
        write_peft(NEW, ".", overwrite=False)
    assert which(dst) == (8.0, 1.0)


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EXDEV], ids=["EBUSY", "EXDEV"])
def test_a_folder_that_cannot_be_swapped_is_filled_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """The swap fails with EBUSY (a bind mount) or EXDEV: the new files are renamed in, the config last, and
    nothing is left beside the folder or in it."""
    dst = tmp_path / "peft"
    with_card(dst, OLD)

    def busy(tmp: Path, dest: Path) -> None:
        raise OSError(err, os.strerror(err), os.fspath(tmp), None, os.fspath(dest))

    monkeypatch.setattr(adapterpack.atomic, "_exchange_dir", busy)
    write_peft(NEW, dst)
    assert which(dst) == (16.0, 2.0) and (dst / "README.md").read_text() == "model card"
    assert listing(dst) == ["README.md", "adapter_config.json", "adapter_model.safetensors"] and listing(tmp_path) == ["peft"]


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "error"])
def test_a_mount_point_is_never_a_readable_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill: bool) -> None:
    """A mount point, written in place and stopped before each step: the folder is the old one or the new one
    bit for bit, or old or new files without a config (refused), never new weights with the old config; an
    error before the first rename leaves the old folder; the next `convert --force` writes the new folder and
    removes what a killed one left."""
    src = tmp_path / "new.apack"
    write_apack(src, NEW)
    dst = tmp_path / "peft"
    with_card(dst, NEW)
    new = snapshot(dst)
    with_card(dst, OLD)
    old = snapshot(dst)
    real = os.path.ismount

    def busy(tmp: Path, dest: Path) -> None:  # as rename(2) of a mount point
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), os.fspath(tmp), None, os.fspath(dest))

    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(dst) or real(p))
    monkeypatch.setattr(adapterpack.atomic, "_exchange_dir", busy)
    refused = []

    def reset() -> None:
        with_card(dst, OLD)
        assert listing(tmp_path) == ["new.apack", "peft"] and snapshot(dst) == old

    def check() -> None:
        got = {k: v for k, v in snapshot(dst).items() if not k.startswith(".peft.")}  # type: ignore[union-attr]
        if got not in (old, new):  # a killed writer's temp folder aside
            assert got in [{k: v for k, v in ver.items() if k != "adapter_config.json"} for ver in (old, new)]  # type: ignore[union-attr]
            with pytest.raises(InputError, match=r"no adapter_config\.json"):
                which(dst)
            refused.append(1)
            convert(src, dst, to="peft", force=True)  # the next write: the new folder, nothing left
            assert snapshot(dst) == new
        else:
            assert which(dst) in ((8.0, 1.0), (16.0, 2.0))

    steps = every_step(lambda: convert(src, dst, to="peft", force=True), reset, check, kill)
    assert steps > 3 and 0 < len(refused) < steps
    convert(src, dst, to="peft", force=True)
    assert snapshot(dst) == new and listing(tmp_path) == ["new.apack", "peft"]


def test_a_reader_between_the_renames_of_a_write_in_place_tries_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader opens the folder while a writer in place has the config aside: it pauses and opens the folder
    again (reading the whole version then there); a folder whose config stays missing is refused."""
    dst = tmp_path / "peft"
    write_peft(OLD, dst)
    real = adapterpack.atomic._open_all
    calls = []

    def aside_once(folder: Path, names: object) -> object:
        calls.append(1)
        if len(calls) == 1 and (dst / "adapter_config.json").exists():
            os.rename(dst / "adapter_config.json", tmp_path / "aside")
            try:
                return real(folder, names)  # type: ignore[arg-type]
            finally:
                os.rename(tmp_path / "aside", dst / "adapter_config.json")
        return real(folder, names)  # type: ignore[arg-type]

    monkeypatch.setattr(adapterpack.atomic, "_open_all", aside_once)
    assert which(dst) == (8.0, 1.0) and len(calls) == 2
    (dst / "adapter_config.json").unlink()
    calls.clear()
    with pytest.raises(InputError, match=r"no adapter_config\.json"):
        read_peft(dst)
    assert len(calls) == adapterpack.atomic._PIN_TRIES


# --- reading a damaged folder ----------------------------------------------------------------------


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd")
@pytest.mark.parametrize("kind", ["loop", "socket", "fifo"])
def test_an_unopenable_file_is_an_input_error_and_leaks_nothing(tmp_path: Path, kind: str) -> None:
    """adapter_model.safetensors a link to itself (ELOOP), a socket (ENXIO) or a FIFO (must not block): an
    InputError naming the folder (and the file), and no file descriptor left open after 50 reads."""
    import socket

    dst = tmp_path / "peft"
    write_peft(OLD, dst)
    weights = dst / "adapter_model.safetensors"
    weights.unlink()
    sock = None
    if kind == "loop":
        weights.symlink_to(weights.name)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(weights))
    else:
        os.mkfifo(weights)
    want = f"{weights}: cannot open it" if kind != "fifo" else f"{dst}: no adapter_model.safetensors"
    try:
        before = fds()
        for _ in range(50):
            with pytest.raises(InputError) as e:
                adapterpack.open(dst)
            assert type(e.value) is InputError and str(e.value).startswith(want), str(e.value)
        assert fds() == before
    finally:
        if sock is not None:
            sock.close()


# --- stale temp files and unnamed files --------------------------------------------------------------


def test_a_writer_in_another_pid_namespace_is_not_taken_for_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers of one pod share a host name, not pids: a temp file tagged by a writer of the same host name in
    another PID namespace stays, even where a process of its pid is missing here."""
    from adapterpack.atomic import _HOST, _host_tag

    real = os.stat

    def other_ns(path: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == "/proc/self/ns/pid":
            return os.stat_result((st.st_mode, st.st_ino + 1, *tuple(st)[2:]))
        return st

    monkeypatch.setattr(os, "stat", other_ns)
    other = _host_tag()
    monkeypatch.undo()
    assert other != _HOST == _host_tag()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    name = f".out.apack.{other}-{dead}.0123abcd.tmp"
    (tmp_path / name).write_bytes(b"partial")
    write_apack(tmp_path / "out.apack", OLD)
    assert listing(tmp_path) == sorted([name, "out.apack"])


@pytest.mark.skipif(not (hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")), reason="needs O_TMPFILE")
@pytest.mark.parametrize("err", [errno.ENOENT, errno.EPERM, errno.EACCES])
def test_unnamed_files_that_cannot_be_linked_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """O_TMPFILE works but linking through /proc/self/fd does not (gVisor, hidepid): the file is copied to a
    temp name and written whole, created or replaced; later writes use temp names; nothing is left."""
    want_new = write_kohya(NEW, tmp_path / "want" / "new.safetensors").read_bytes()
    want_old = write_kohya(OLD, tmp_path / "want" / "old.safetensors").read_bytes()
    real = os.link

    def no_proc(src: object, dst: object, **kwargs: object) -> None:
        if os.fspath(src).startswith("/proc/self/fd/"):  # type: ignore[call-overload]
            raise OSError(err, os.strerror(err), src)
        real(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adapterpack.atomic, "_TMPFILE", True)
    monkeypatch.setattr(os, "link", no_proc)
    work = tmp_path / "work"
    dst = write_kohya(OLD, work / "lora.safetensors", overwrite=False)
    assert dst.read_bytes() == want_old and adapterpack.atomic._TMPFILE is False
    monkeypatch.setattr(adapterpack.atomic, "_TMPFILE", True)
    write_kohya(NEW, dst)
    assert dst.read_bytes() == want_new and listing(work) == ["lora.safetensors"]
    with pytest.raises(OutputExistsError):
        write_kohya(OLD, dst, overwrite=False)
    assert dst.read_bytes() == want_new and listing(work) == ["lora.safetensors"]
