"""Saves are atomic and exclusive (issue 27, "Data loss"): temporary names cannot be
redirected by planted links, two saves racing for one name cannot both win, a save killed
at any point leaves the previous one loadable and nothing that blocks the next, and a
dangling link is a name that exists. Real saves of a small retrofitted ResNet-18."""

from __future__ import annotations

import itertools
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import retrofit
import retrofit.atomic as atomic
import retrofit.build
from retrofit import SaveError
from retrofit.atomic import TEMP_PREFIX, clean_stale, write_file_atomic
from retrofit.cli import main
from retrofit.saving import load_training_state, save_training_state

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(shift: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=3), "se", input_size=(3, 32, 32))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(shift)
    return gm.eval()


@pytest.fixture(scope="module")
def gm() -> nn.Module:
    return _model(0.01)


@pytest.fixture(scope="module")
def gm2() -> nn.Module:
    return _model(0.02)


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _loads_as(path: Path, model: nn.Module) -> bool:
    return torch.equal(_out(retrofit.load(path)), _out(model))


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"{TEMP_PREFIX}*"))


def _canary(tmp_path: Path) -> tuple[Path, Path]:
    """A file and a folder another user's links point at: they must not change."""
    file, folder = tmp_path / "canary.txt", tmp_path / "canary-dir"
    file.write_text("canary")
    file.chmod(0o600)
    folder.mkdir()
    return file, folder


def _canary_intact(file: Path, folder: Path) -> None:
    assert file.read_text() == "canary" and stat.S_IMODE(file.stat().st_mode) == 0o600
    assert list(folder.iterdir()) == []


def test_planted_links_at_temporary_names_cannot_redirect_a_write(
        tmp_path: Path, gm: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    file, folder = _canary(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    pid = os.getpid()
    # The names earlier versions wrote to, for this process...
    for name in ("m.safetensors", "last.pt", "model.safetensors", "recipe.json"):
        (out / f".{name}.{pid}.tmp").symlink_to(file)
    (out / "run").mkdir()
    for name in ("model.safetensors", "recipe.json"):
        (out / "run" / f".{name}.{pid}.tmp").symlink_to(file)
    # ...and the staging folder's next name, made predictable: every candidate is planted.
    host = atomic._HOST
    planted = [f"planted{i}" for i in range(3)]
    for i, name in enumerate(planted):
        (out / f"{TEMP_PREFIX}{pid}-{host}-{name}").symlink_to(folder if i % 2 else file)
    counter = itertools.count()
    monkeypatch.setattr("tempfile._get_candidate_names",
                        lambda: itertools.chain(planted, (f"free{next(counter)}" for _ in itertools.count())))

    retrofit.save(gm, out / "m.safetensors")
    retrofit.save(gm, out / "m.safetensors", force=True)
    retrofit.save(gm, out / "run", force=True)  # an existing folder: swapped
    retrofit.save(gm, out / "new")
    save_training_state(out / "last.pt", {"recipe": None, "model": {}})
    save_training_state(out / "last.pt", {"recipe": None, "model": {}})

    _canary_intact(file, folder)
    assert all((out / f"{TEMP_PREFIX}{pid}-{host}-{n}").is_symlink() for n in planted)
    assert _loads_as(out / "m.safetensors", gm) and _loads_as(out / "run", gm) and _loads_as(out / "new", gm)
    assert load_training_state(out / "last.pt")["model"] == {}
    for path in (out / "m.safetensors", out / "run" / "model.safetensors", out / "last.pt"):
        assert not path.is_symlink() and path.is_file()


def test_temporary_files_are_written_in_a_private_folder_beside_the_target(
        tmp_path: Path, gm: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_model

    seen: list[tuple[Path, int]] = []

    def spy(model: Any, filename: str, **kwargs: Any) -> None:
        seen.append((Path(filename).parent, stat.S_IMODE(os.lstat(Path(filename).parent).st_mode)))
        save_model(model, filename, **kwargs)

    monkeypatch.setattr("retrofit.saving.save_model", spy)
    old = os.umask(0o022)
    try:
        retrofit.save(gm, tmp_path / "m.safetensors")
        retrofit.save(gm, tmp_path / "d")
    finally:
        os.umask(old)
    assert [(p.parent, p.name.startswith(f"{TEMP_PREFIX}{os.getpid()}-"), mode) for p, mode in seen] == \
        [(tmp_path, True, 0o700)] * 2
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("name", ["m.safetensors", "folder"])
def test_two_concurrent_saves_without_force_one_wins(
        tmp_path: Path, gm: nn.Module, gm2: nn.Module, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both saves are past their "does it exist" check and writing when either claims the
    name (a barrier in the weights' write): exactly one may succeed."""
    from safetensors.torch import save_model

    barrier = threading.Barrier(2, timeout=120)

    def together(*args: Any, **kwargs: Any) -> None:
        barrier.wait()
        save_model(*args, **kwargs)

    monkeypatch.setattr("retrofit.saving.save_model", together)
    # Rebuilding the recipe on the meta device is not thread-safe (two threads tracing at
    # once fail): that check runs one at a time; the writes and the claims race.
    lock, check = threading.Lock(), retrofit.build._check_rebuilds

    def one_at_a_time(*args: Any) -> None:
        with lock:
            check(*args)

    monkeypatch.setattr("retrofit.build._check_rebuilds", one_at_a_time)
    path = tmp_path / name
    results: dict[str, Any] = {}

    def run(key: str, model: nn.Module) -> None:
        try:
            results[key] = retrofit.save(model, path)
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            results[key] = e

    threads = [threading.Thread(target=run, args=(k, m)) for k, m in (("a", gm), ("b", gm2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert sorted(type(r).__name__ for r in results.values()) == ["PosixPath", "SaveError"]
    winner = gm if isinstance(results["a"], Path) else gm2
    loser = next(r for r in results.values() if isinstance(r, SaveError))
    assert str(loser) == f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)"
    assert _loads_as(path, winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def _old_folder_save(tmp_path: Path, gm: nn.Module) -> Path:
    run = tmp_path / "run"
    retrofit.save(gm, run)
    (run / "results.csv").write_text("epoch,acc\n1,0.5\n")
    (run / "logs").mkdir()
    (run / "logs" / "train.log").write_text("log")
    (run / "latest").symlink_to("results.csv")
    return run


def _kept_the_others(run: Path) -> None:
    assert sorted(p.name for p in run.iterdir()) == ["latest", "logs", "model.safetensors", "recipe.json",
                                                     "results.csv"]
    assert (run / "results.csv").read_text() == "epoch,acc\n1,0.5\n" and (run / "logs" / "train.log").read_text() == "log"
    assert os.readlink(run / "latest") == "results.csv"


def test_force_resave_interrupted_at_the_swap_keeps_the_old_save(
        tmp_path: Path, gm: nn.Module, gm2: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _old_folder_save(tmp_path, gm)

    def interrupted(stage: Path, dest: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("retrofit.atomic._swap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrofit.save(gm2, run, force=True)
    assert _loads_as(run, gm) and _temps(tmp_path) == []
    _kept_the_others(run)
    monkeypatch.undo()
    retrofit.save(gm2, run, force=True)
    assert _loads_as(run, gm2) and _temps(tmp_path) == []
    _kept_the_others(run)


def test_force_resave_without_rename_exchange_interrupted_between_its_renames(
        tmp_path: Path, gm: nn.Module, gm2: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing the old folder is renamed away, then the new one in: an
    interruption between the two renames puts the old one back."""
    run = _old_folder_save(tmp_path, gm)
    monkeypatch.setattr("retrofit.atomic._renameat2", lambda *args: False)
    real, calls = os.rename, itertools.count()

    def second_fails(src: Any, dst: Any) -> None:
        if next(calls) == 1:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        retrofit.save(gm2, run, force=True)
    monkeypatch.setattr(os, "rename", real)
    assert _loads_as(run, gm) and _temps(tmp_path) == []
    _kept_the_others(run)
    retrofit.save(gm2, run, force=True)  # the fallback's swap itself
    assert _loads_as(run, gm2) and _temps(tmp_path) == []
    _kept_the_others(run)


# A save in another process, stopped (blocked) at one step, then killed with SIGKILL.
_CHILD = """
import os, sys, time
from pathlib import Path
import torch, retrofit, retrofit.atomic as atomic
case, src, dest, ready = sys.argv[1:]
gm = retrofit.load(src)
with torch.no_grad():
    for p in gm.parameters():
        p.add_(1.0)
def block(*args, **kwargs):
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)
point = {"new-file": "_claim_file", "new-folder": "_rename_new", "force-folder": "_swap",
         "force-folder-fallback": "_swap-second-rename"}[case]
if point == "_swap-second-rename":
    atomic._renameat2 = lambda *args: False
    real = os.rename
    def rename(a, b):
        real(a, b)
        if Path(b).name.startswith(atomic.TEMP_PREFIX):  # the old folder renamed away
            block()
    os.rename = rename
else:
    setattr(atomic, point, block)
retrofit.save(gm, dest, force=case.startswith("force"))
"""
_CASES = ["new-file", "new-folder", "force-folder", "force-folder-fallback"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, gm: nn.Module) -> Iterator[dict[str, tuple[Path, int]]]:
    """The four killed saves, started together (each child imports torch: seconds)."""
    root = tmp_path_factory.mktemp("killed")
    src = retrofit.save(gm, root / "src.safetensors")
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    for case in _CASES:
        folder = root / case
        folder.mkdir()
        dest = folder / ("m.safetensors" if case == "new-file" else "run")
        if case.startswith("force"):
            _old_folder_save(folder, gm)
        ready = root / f"{case}.ready"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, case, str(src), str(dest), str(ready)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs[case] = (proc, ready, dest)
    done: dict[str, tuple[Path, int]] = {}
    try:
        deadline = time.monotonic() + 240
        for case, (proc, ready, dest) in procs.items():
            while not (ready.exists() and ready.read_text()):
                if proc.poll() is not None:
                    pytest.fail(f"{case}: the child ended before blocking: {proc.stderr.read().decode()[-2000:]}"
                                if proc.stderr else case)
                assert time.monotonic() < deadline, f"{case}: the child did not block in time"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)  # reaped: its pid no longer exists
            done[case] = (dest, proc.pid)
        yield done
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


def _child_temps(dest: Path, pid: int) -> list[Path]:
    return sorted(dest.parent.glob(f"{TEMP_PREFIX}{pid}-*"))


@pytest.mark.parametrize("case", ["new-file", "new-folder"])
def test_killed_new_save_leaves_no_temp_after_the_next_save_and_does_not_block_it(
        killed: dict[str, tuple[Path, int]], gm: nn.Module, case: str) -> None:
    dest, pid = killed[case]
    left = _child_temps(dest, pid)
    # What the kill left: the complete staged weights (full size), not at the name.
    assert len(left) == 1 and not os.path.lexists(dest)
    staged = left[0] / ("m.safetensors" if case == "new-file" else "model.safetensors")
    assert staged.stat().st_size > 40_000_000
    retrofit.save(gm, dest)  # no --force needed: nothing at the name
    assert _loads_as(dest, gm)
    assert _temps(dest.parent) == []


@pytest.mark.parametrize("case", ["force-folder", "force-folder-fallback"])
def test_killed_force_resave_leaves_the_old_save_loadable(
        killed: dict[str, tuple[Path, int]], gm: nn.Module, gm2: nn.Module, case: str) -> None:
    dest, pid = killed[case]
    left = _child_temps(dest, pid)
    if case == "force-folder":  # killed before the exchange: the old save is untouched
        assert len(left) == 1 and (left[0] / "model.safetensors").stat().st_size > 40_000_000
    else:
        # Killed between the fallback's two renames: no folder at the name until the next
        # write in that folder (here clean_stale alone) renames the old one back.
        assert not os.path.lexists(dest) and [p.name.endswith("-was-run") for p in left].count(True) == 1
        assert sorted(clean_stale(dest.parent)) == sorted([dest, *(p for p in left if "-was-" not in p.name)])
    assert _loads_as(dest, gm)
    _kept_the_others(dest)
    retrofit.save(gm2, dest, force=True)
    assert _loads_as(dest, gm2) and _temps(dest.parent) == []
    _kept_the_others(dest)


def test_stale_temps_of_live_processes_and_other_machines_are_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other_host = "0" * 8 if atomic._HOST != "0" * 8 else "1" * 8
    names = {
        "dead": f"{TEMP_PREFIX}{dead.pid}-{atomic._HOST}-abc",
        "live": f"{TEMP_PREFIX}{os.getppid()}-{atomic._HOST}-abc",
        "mine": f"{TEMP_PREFIX}{os.getpid()}-{atomic._HOST}-abc",
        "other machine": f"{TEMP_PREFIX}{dead.pid}-{other_host}-abc",
        "not ours": ".retrofit-tmpX",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"x" * 100)
    assert clean_stale(tmp_path) == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")


@pytest.mark.parametrize("name", ["m.safetensors", "folder"])
def test_a_dangling_link_exists(tmp_path: Path, gm: nn.Module, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    link, nowhere = tmp_path / name, tmp_path / "nowhere"
    link.symlink_to(nowhere)
    with pytest.raises(SaveError, match=rf"^'{link}' exists \(a symbolic link\); not overwriting it \(pass --force "):
        retrofit.save(gm, link)
    assert main(["test_resnet", "--attn", "se", "--out", str(link)]) == 2  # the CLI says so before building
    assert capsys.readouterr().err.strip() == (f"retrofit: error: {str(link)!r} exists (a symbolic link); not "
                                               "overwriting it (pass --force to replace it)")
    assert link.is_symlink() and not os.path.lexists(nowhere)
    retrofit.save(gm, link, force=True)  # the link itself is replaced, never its target
    assert not link.is_symlink() and (link.is_file() if name.endswith(".safetensors") else link.is_dir())
    assert not os.path.lexists(nowhere) and _loads_as(link, gm)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_force_replaces_a_link_not_its_target(tmp_path: Path, gm: nn.Module) -> None:
    file, folder = _canary(tmp_path)
    (tmp_path / "f.safetensors").symlink_to(file)
    (tmp_path / "d").symlink_to(folder)
    retrofit.save(gm, tmp_path / "f.safetensors", force=True)
    retrofit.save(gm, tmp_path / "d", force=True)
    _canary_intact(file, folder)
    assert not (tmp_path / "f.safetensors").is_symlink() and not (tmp_path / "d").is_symlink()
    assert _loads_as(tmp_path / "f.safetensors", gm) and _loads_as(tmp_path / "d", gm)


def test_a_folder_save_claims_an_empty_folder_as_existing(tmp_path: Path, gm: nn.Module,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaveError, match="exists; not overwriting it"):
        retrofit.save(gm, tmp_path / "empty")
    # An empty folder made between the check and the rename (where renameat2 is missing,
    # rename itself would replace it): refused too, with renameat2's RENAME_NOREPLACE.
    real = atomic._rename_new

    def racer(stage: Path, dest: Path) -> None:
        dest.mkdir()
        real(stage, dest)

    monkeypatch.setattr("retrofit.atomic._rename_new", racer)
    with pytest.raises(SaveError, match="racing' exists; not overwriting it"):
        retrofit.save(gm, tmp_path / "racing")
    assert list((tmp_path / "racing").iterdir()) == [] and _temps(tmp_path) == []


def test_training_checkpoints_replace_through_the_safe_primitive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file, folder = _canary(tmp_path)
    last = tmp_path / "out" / "last.pt"
    save_training_state(last, {"recipe": None, "model": {"w": torch.ones(2)}, "epoch": 1})
    (last.parent / f".last.pt.{os.getpid()}.tmp").symlink_to(file)  # the old predictable name

    def killed_mid_write(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(last, {"recipe": None, "model": {"w": torch.zeros(2)}, "epoch": 2})
    monkeypatch.undo()
    assert load_training_state(last)["epoch"] == 1 and _temps(tmp_path) == []
    save_training_state(last, {"recipe": None, "model": {"w": torch.zeros(2)}, "epoch": 2})
    assert load_training_state(last)["epoch"] == 2
    _canary_intact(file, folder)
    (last.parent / "unwritable").mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(SaveError, match=r"^cannot write '.*unwritable/last.pt': Permission denied; check"):
            save_training_state(last.parent / "unwritable" / "last.pt", {"model": {}})


def _no_hard_links(*args: Any, **kwargs: Any) -> None:
    raise PermissionError(1, "Operation not permitted")


def test_an_exclusive_write_loses_to_a_racer_and_keeps_its_file(tmp_path: Path) -> None:
    """The primitive every save uses: a file that appears while the write is staged wins."""
    dest = tmp_path / "x.bin"

    def racer_appears(tmp: Path) -> None:
        tmp.write_bytes(b"mine")
        dest.write_bytes(b"racer")

    with pytest.raises(SaveError, match=r"x.bin' exists; not overwriting it"):
        write_file_atomic(dest, racer_appears, replace=False)
    assert dest.read_bytes() == b"racer" and _temps(tmp_path) == []
    for fallback in ("no renameat2", "no hard links"):
        dest.unlink()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("retrofit.atomic._renameat2", lambda *args: False)
            if fallback == "no hard links":
                mp.setattr(os, "link", _no_hard_links)
            with pytest.raises(SaveError, match=r"x.bin' exists; not overwriting it"):
                write_file_atomic(dest, racer_appears, replace=False)
            assert dest.read_bytes() == b"racer"
            dest.unlink()
            write_file_atomic(dest, lambda t: t.write_bytes(b"mine"), replace=False)
        assert dest.read_bytes() == b"mine" and _temps(tmp_path) == []


def test_ultralytics_checkpoint_claims_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import retrofit.ultralytics

    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    file, folder = _canary(tmp_path)
    path = tmp_path / "y.pt"
    (tmp_path / f".y.pt.{os.getpid()}.tmp").symlink_to(file)
    real = torch.save

    def racer_appears(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real(obj, f, *args, **kwargs)
        path.write_bytes(b"racer")

    monkeypatch.setattr(torch, "save", racer_appears)
    with pytest.raises(SaveError, match=r"y.pt' exists; not overwriting it"):
        retrofit.ultralytics.save_checkpoint(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"racer"
    retrofit.ultralytics.save_checkpoint(model, path, force=True)
    assert path.stat().st_size > 1_000_000 and _temps(tmp_path) == []
    path.unlink()
    path.symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(SaveError, match=r"y.pt' exists; not overwriting it"):
        retrofit.ultralytics.save_checkpoint(model, path)
    _canary_intact(file, folder)


def test_save_for_hub_writes_a_new_folder_in_one_rename(tmp_path: Path, gm: nn.Module, gm2: nn.Module,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from retrofit.publish import save_for_hub

    up = save_for_hub(gm, tmp_path / "up", "me/x")
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "model.safetensors", "recipe.json"]
    assert _temps(tmp_path) == []
    (up / "extra.txt").write_text("kept")
    card = (up / "README.md").read_text()

    def interrupted(stage: Path, dest: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("retrofit.atomic._swap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_for_hub(gm2, up, "me/y", force=True)
    monkeypatch.undo()
    assert _loads_as(up, gm) and (up / "README.md").read_text() == card and _temps(tmp_path) == []
    with pytest.raises(SaveError, match="exists; not overwriting it"):
        save_for_hub(gm2, up, "me/y")
    save_for_hub(gm2, up, "me/y", force=True)
    assert _loads_as(up, gm2) and "me/y" in (up / "README.md").read_text()
    assert (up / "extra.txt").read_text() == "kept" and _temps(tmp_path) == []
