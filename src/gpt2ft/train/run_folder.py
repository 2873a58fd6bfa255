"""The run folder, written in one place:

    RUN/.gpt2ft-output.json   which verb made it ({"made_by": "gpt2ft sft"})
    RUN/.lock                 held (lockf) while a process trains here; the OS drops it when the process dies
    RUN/config.yaml           the resolved options and run metadata
    RUN/metrics.jsonl         one JSON object per logged step / evaluation
    RUN/samples.jsonl         generations at each evaluation
    RUN/checkpoints/step-N/   complete checkpoints (COMPLETE marker written last); latest -> newest, best -> best

A run folder is only ever written by the verb that made it; a finished run is never silently restarted.
Checkpoints are saved whole by the main process, from the state dict the strategy gathered (whole even
when the model is sharded over processes), in the same files whatever the strategy.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import (CHECKPOINTS_DIR, TRAIN_STATE_FILE, commit_checkpoint, restore_checkpoint_weights,
                          run_checkpoints, verify_checkpoint, write_checkpoint_files)
from ..errors import UserError
from ..fileio import (OUTPUT_MARKER, RUN_VERBS, WRITTEN_LEDGER, atomic_torch_save, atomic_write_json,
                      atomic_write_text, made_by, make_dir)

LOCK_FILE = ".lock"
# What a run owns (deleted by --overwrite); anything else in the folder is the user's and stays.
RUN_FILES = ("checkpoints", "latest", "best", "metrics.jsonl", "samples.jsonl", "config.yaml", "splits",
             "rejected.jsonl", "data", "reference_logps", "loss.png", "loss.pdf", "tensorboard")
# What a run writes inside its folders among RUN_FILES (glob patterns); anything else there is the user's.
RUN_FOLDER_FILES = {"checkpoints": ("step-*", ".tmp-*"), "splits": ("train.jsonl", "val.jsonl", "test.jsonl", ".tmp-*"),
                    "data": ("train.bin", "val.bin", "meta.json", OUTPUT_MARKER, WRITTEN_LEDGER, ".tmp-*"),
                    "reference_logps": ("logps.pt", ".tmp-*"), "tensorboard": ("events.out.tfevents.*",)}
# --overwrite moves the replaced run's files here and deletes them only once the new run starts training: a
# command that fails before (a bad flag found once the model loads, a Ctrl-C) puts them back.
REPLACED = ".replaced-run"
REPLACED_NAMES = ".names.json"  # in REPLACED: the RUN_FILES it holds


class RunFolder:
    """A claimed run folder (open_run): the main process holds its lock (`lock`, a file descriptor) until
    the run ends (`close`) or the process exits."""

    def __init__(self, path: Path, main: bool = True, lock: int | None = None):
        self.path, self.main, self.lock = path, main, lock

    def close(self) -> None:
        """Release the lock when the run ends (the folder stays claimed: marked as this verb's)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    def checkpoints(self) -> list[Path]:
        return run_checkpoints(self.path)

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / "config.yaml", text)

    def start_fresh(self) -> None:
        """Logs of an earlier start that never saved a checkpoint are not this run's."""
        for p in (self.metrics, self.samples):
            p.unlink(missing_ok=True)

    def drop_replaced(self) -> None:
        """The new run starts training: the run --overwrite replaced is deleted now."""
        if (self.path / REPLACED).exists():
            trash = self.path / f".tmp-{REPLACED}"  # renamed first: a kill mid-delete leaves only a temp folder
            os.replace(self.path / REPLACED, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Temp files and folders of a save that was killed (kill -9) before it committed."""
        for leftover in list(self.path.glob(".tmp-*")) + list((self.path / CHECKPOINTS_DIR).glob(".tmp-*")):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    # ----- checkpoints ----------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS_DIR / f"step-{step:08d}"

    def save(self, model, tokenizer, meta: dict, trainer_state: dict, keep_last: int, best: bool,
             state: dict | None = None) -> Path:
        """Write checkpoints/step-N atomically, point latest (and best) at it, then rotate old ones. The
        weights are `state` (the model's whole state dict) or else the model's own."""
        weights = model.state_dict() if state is None else state
        for name, tensor in weights.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(f"refusing to save non-finite weights ({name}); the last good checkpoint is "
                                f"{self.path / 'latest'}")
        final = self.checkpoint_dir(trainer_state["state"]["step"])
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=root))
        try:
            write_checkpoint_files(tmp, model, tokenizer, meta, weights)
            atomic_torch_save(trainer_state, tmp / TRAIN_STATE_FILE)
            commit_checkpoint(tmp, final)
        except BaseException:  # an error or a second Ctrl-C: leave no temp folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._link("latest", final)
        if best:
            self._link("best", final)
        best_target = (self.path / "best").resolve() if (self.path / "best").exists() else None
        for old in self.checkpoints()[keep_last:]:
            if old.resolve() != best_target:  # renamed first: a kill mid-delete leaves no half folder at a final name
                trash = old.with_name(f".tmp-rotated-{old.name}")
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return final

    def _link(self, name: str, target: Path) -> None:
        """Point RUN/name at target (relative symlink, replaced atomically)."""
        tmp = self.path / f".tmp-link-{name}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.path), tmp)
        os.replace(tmp, self.path / name)

    def resume_point(self, resume: str, log) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its trainer state; 'auto' skips damaged ones with a log line."""
        if resume == "auto":
            candidates = self.checkpoints()
            if not candidates:
                log(f"--resume auto: no checkpoint in {self.path}, starting fresh")
                return None
        else:
            candidates = [Path(resume)]
        for folder in candidates:
            problem = verify_checkpoint(folder) if (folder / TRAIN_STATE_FILE).exists() or resume == "auto" \
                else f"no {TRAIN_STATE_FILE} (not a training checkpoint)"
            if problem is None:
                try:
                    return folder, torch.load(folder / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001 - any unreadable state counts as damaged
                    problem = f"unreadable {TRAIN_STATE_FILE} ({type(e).__name__})"
            if resume != "auto":
                raise UserError(f"--resume {folder}: cannot resume from it: {problem}")
            log(f"--resume auto: skipping {folder}: {problem}")
        raise UserError(f"--resume auto: no intact checkpoint in {self.path / CHECKPOINTS_DIR}")

    @staticmethod
    def restore_weights(model, folder: Path) -> None:
        restore_checkpoint_weights(model, folder)


def open_run(out: str | Path | None, kind: str, resume: str | None = None, overwrite: bool = False) -> RunFolder:
    """Claim `out` as the run folder of `gpt2ft KIND`: refuse what is not ours to write, lock it. Called
    once per run (by the recipe, or by train() when it is handed none).

    - absent or empty: created and marked;
    - another process trains there: refused (the lock);
    - holds a run with checkpoints: refused unless --resume (same verb) or --overwrite (the run's own files,
      RUN_FILES, are set aside and deleted once the new run starts training: drop_replaced; nothing else);
    - not empty and not made by gpt2ft: refused unless --overwrite (then nothing there is deleted).
    That `out` is no input of the run (MODEL, --data, ...) the recipe has checked before.
    Only the main process (RANK 0) claims; the others use the folder it claimed.
    """
    if not out:
        raise UserError("--out is required: the run folder for checkpoints and logs")
    path = Path(out)
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        return RunFolder(path, main)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; the run folder must be a folder")
    verb = f"gpt2ft {kind}"
    owner = made_by(path) if path.exists() else None
    contents = [p for p in path.iterdir() if p.name not in (OUTPUT_MARKER, LOCK_FILE)] if path.exists() else []
    if owner is not None and owner != verb and owner not in RUN_VERBS:  # a tokenizer, data, a model, a report
        raise UserError(f"--out {path} was made by `{owner}`; choose another folder (not even --overwrite lets "
                        "a run replace another verb's folder)")
    if contents and owner is None:  # refused before the lock, so no lock file is left in a user's folder
        clashing = _run_files(path)
        if overwrite and clashing:  # --overwrite never deletes what gpt2ft did not write
            raise UserError(f"--out {path} was not made by gpt2ft but holds {', '.join(clashing)}, which a "
                            "run would replace; move them away or choose another --out")
        if not overwrite:
            raise UserError(f"--out {path} is not empty and was not made by gpt2ft; choose a new folder, or pass "
                            "--overwrite to write into it anyway (nothing of yours there is deleted)")
    created = not path.exists()
    if contents:
        lock = _lock(path)  # before looking closer: a run in progress is refused as such
        _put_back(path)  # an earlier --overwrite killed before its run trained: the run it replaced is back
        checkpoints = run_checkpoints(path)
        if overwrite:
            _set_aside(path, lock)
        elif owner != verb:
            os.close(lock)
            raise UserError(f"--out {path} was made by `{owner}`; choose a new folder for `{verb}` "
                            "(or pass --overwrite to replace that run)")
        elif checkpoints and not resume:
            os.close(lock)
            raise UserError(f"--out {path} already holds a run (newest checkpoint {checkpoints[0].name}); pass "
                            "--resume auto to continue it, --overwrite to start it over, or choose a new --out")
    else:
        make_dir(path)
        lock = _lock(path)
    folder = RunFolder(path, main, lock)
    if (path / REPLACED).exists():
        _REPLACING.append(folder)
    if created:
        _CREATED.append(folder)
    if owner != verb:
        atomic_write_json(path / OUTPUT_MARKER, {"made_by": verb})
    return folder


_REPLACING: list[RunFolder] = []  # run folders whose --overwrite set a run aside, until training starts
_CREATED: list[RunFolder] = []  # the run folders this process created, until they hold more than the marker
# What a new run folder holds before its model loads (the data's splits, rejected rows, finetune's prepared
# text): a refusal there
# (a bad model, adapter or reference) still leaves nothing behind.
BEFORE_TRAINING = {OUTPUT_MARKER, LOCK_FILE, "splits", "rejected.jsonl", "data"}


def remove_unused() -> None:
    """Remove the run folders this process created that hold nothing but BEFORE_TRAINING, and put back a run
    that --overwrite set aside: a verb or a recipe that fails before training leaves what was there
    (called when a recipe fails, when a run ends and at exit)."""
    while _REPLACING:
        _put_back(_REPLACING.pop().path)
    while _CREATED:
        folder = _CREATED.pop()
        try:
            if {p.name for p in folder.path.iterdir()} <= BEFORE_TRAINING:
                folder.close()
                shutil.rmtree(folder.path, ignore_errors=True)
        except OSError:
            pass


atexit.register(remove_unused)


def _set_aside(path: Path, lock: int) -> None:
    """--overwrite: move the run's own files (RUN_FILES) into REPLACED; refused while one of its folders holds
    a file the run did not write (--overwrite never deletes what is the user's)."""
    import fnmatch

    for name, patterns in RUN_FOLDER_FILES.items():
        if (path / name).is_dir() and not (path / name).is_symlink():
            theirs = sorted(p.name for p in (path / name).iterdir()
                            if not any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns))
            if theirs:
                os.close(lock)
                raise UserError(f"--out {path / name} holds {', '.join(theirs[:3])}, which no run wrote, and "
                                "--overwrite would delete it with the run: move it out of the folder first")
    names = _run_files(path)
    (path / REPLACED).mkdir()
    atomic_write_json(path / REPLACED / REPLACED_NAMES, names)  # what to put back, whatever moved already
    for name in names:
        os.replace(path / name, path / REPLACED / name)


def _put_back(path: Path) -> None:
    """The run set aside in REPLACED back in its place; whatever the new run wrote before it trained goes.
    Safe to repeat after a kill at any point: each file moves back once, as REPLACED_NAMES lists them."""
    replaced = path / REPLACED
    if not replaced.exists():
        return
    try:
        names, listed = json.loads((replaced / REPLACED_NAMES).read_text()), True
    except (OSError, ValueError):  # killed before the list was written: nothing moved, no new run wrote
        names, listed = [p.name for p in replaced.iterdir()], False
    for name in _run_files(path):
        if (listed and name not in names) or (replaced / name).exists() or (replaced / name).is_symlink():
            _remove(path / name)  # the new run's (a file of the old run's that is back already stays)
    for name in names:
        if (replaced / name).exists() or (replaced / name).is_symlink():
            os.replace(replaced / name, path / name)
    shutil.rmtree(replaced)


def _run_files(path: Path) -> list[str]:
    """The RUN_FILES present in `path` (a dangling `latest` link counts)."""
    return [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()]


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _lock(path: Path) -> int:
    """Take the run folder's lock; the open descriptor, held until the process exits (the OS releases it
    even on kill -9). A POSIX record lock, so it belongs to the process: the same process may claim the
    folder again (a second run from Python or a notebook, e.g. to resume it), another process may not."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"--out {path} is in use: another gpt2ft process (pid {holder}) is training there; "
                        "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def read_jsonl_steps(path: Path, step: int) -> str:
    """metrics.jsonl truncated to the rows of steps <= step (resume logs the later ones again)."""
    from ..plots import read_metrics

    rows = read_metrics(path.parent)
    for row in rows:
        if not isinstance(row.get("step"), int):
            raise UserError(f"{path}: a row without a step ({json.dumps(row)[:60]}) is not a gpt2ft metrics row; "
                            "move the file away or use a new --out")
    return "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
