"""File I/O every layer shares: atomic writes, safetensors reads with header checks, file hashes, and
output folders that say which verb made them. A leaf: it imports nothing else from gpt2ft but errors."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from .errors import UserError

MAX_SAFETENSORS_HEADER = 100 * 2**20
OUTPUT_MARKER = ".gpt2ft-output.json"  # {"made_by": "gpt2ft VERB"}: what made a folder
WRITTEN_LEDGER = ".gpt2ft-files.json"  # {file name: sha256}: the loose files gpt2ft wrote in a folder
# a folder holding any of these is a model, adapter or run folder: no user file is ever written into it (a run
# folder is known by its marker; its `.lock` is not a sign, as other tools, pytest among them, use that name too)
MODEL_FILES = ("gpt2ft.json", "COMPLETE", "model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
               "adapter_config.json", "model.safetensors.index.json")
RUN_VERBS = ("gpt2ft pretrain", "gpt2ft finetune", "gpt2ft sft", "gpt2ft dpo")  # their folders are runs
TRAINING_VERBS = (*RUN_VERBS, "gpt2ft export")  # their folders hold a model
# verbs whose folder is read back whole (a tokenizer, prepared data, a report): no other file goes in it
FOLDER_VERBS = ("gpt2ft tokenizer train", "gpt2ft prepare", "gpt2ft eval")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import: the mode new files get (0644 under the usual umask)
MAX_USER_FILE = 50 * 2**20  # the most bytes a conversation or other small user file may have
MAX_DATA_FILE = 256 * 2**20  # the most bytes of an instruction or preference data file (parsed whole)


# ----- atomic writes ----------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file in path's folder, fsync, then rename over path."""
    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    _fill_and_rename(Path(path), fill)


def atomic_write_by_path(path: Path, write) -> None:
    """atomic_write for writers that take a file name, not a file (gguf's GGUFWriter): write(temp path)."""
    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _fill_and_rename(Path(path), fill)


def _fill_and_rename(path: Path, fill) -> None:
    """fill(fd, name) a new temp file in path's folder (the folder made if missing), then rename it over
    path. Any failure removes the temp file, and an OSError becomes one error naming `path`, not the temp."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every output private to its writer
        fill(fd, tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _interrupted(e):  # a Ctrl-C inside a writer's cleanup (torch.save's zip) turns into its error
            raise KeyboardInterrupt from None
        raise
    fsync_dir(path.parent)


def _interrupted(e: BaseException | None) -> bool:
    """Whether e is, or arose while handling, a KeyboardInterrupt."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----- the one guarded writer for loose files ---------------------------------------------------
def model_folder_of(path: str | Path) -> Path | None:
    """The model, adapter or training-run folder that `path` is (or lies inside), or None."""
    path = Path(path).expanduser().absolute()
    for folder in (path, *path.parents):
        if not folder.is_dir():
            continue
        if any((folder / name).exists() for name in MODEL_FILES) or made_by(folder) in TRAINING_VERBS:
            return folder
    return None


def _written_by_us(path: Path) -> bool:
    """Whether gpt2ft wrote `path` (recorded in its folder's ledger) and nobody changed it since."""
    try:
        ledger = json.loads((path.parent / WRITTEN_LEDGER).read_text(encoding="utf-8"))
        return isinstance(ledger, dict) and ledger.get(path.name) == file_digest(path)
    except (OSError, ValueError):
        return False


def _check_parents(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a folder that files (or folders, if `path` needs
    some made) can be created in; an existing folder at `path` itself must take files."""
    if path.is_dir():
        _creatable(path, path, what, folder=False)
        return
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {what} {path}: {parent} is a file, not a folder")
            _creatable(parent, path, what, folder=parent != path.parent)
            return


def _creatable(where: Path, path: Path, what: str, folder: bool) -> None:
    """Tried with a probe (a file, or a folder) that is removed again, since permissions alone do not
    say: root may write anywhere by them, yet not in /proc or on a read-only mount."""
    try:
        if folder:
            os.rmdir(tempfile.mkdtemp(prefix=".tmp-probe.", dir=where))
        else:
            fd, probe = tempfile.mkstemp(prefix=".tmp-probe.", dir=where)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: nothing can be created in {where} "
                        f"({e.strerror or e}); choose another place") from None


def check_writable(path: str | Path, *, overwrite: bool = False, inputs=(), what: str = "output",
                   overwrite_hint: str = "pass --overwrite to replace it") -> Path:
    """Check, before any work, that a loose file may be written at `path`; the path, or a UserError.

    Refused: a parent that is a file; a folder at `path`; one of gpt2ft's own record files; `path`
    inside a model or run folder; `path` equal to, holding or inside one of the `inputs` that exist
    (paths, or {flag: path} to name them); an existing
    file gpt2ft did not write (never replaced, even with `overwrite`); an existing file gpt2ft wrote,
    unless `overwrite`.
    """
    path = Path(path).expanduser()
    _check_parents(path, what)
    if path.is_dir():
        raise UserError(f"cannot write {what} {path}: it is a folder; name a file")
    if path.name in (WRITTEN_LEDGER, OUTPUT_MARKER) or path.name.startswith(".tmp-"):
        raise UserError(f"cannot write {what} {path}: gpt2ft uses that name for its own records; choose another")
    named = inputs.items() if isinstance(inputs, dict) else [("the input", source) for source in inputs]
    for name, source in _existing(named):
        if same_path(path, source):
            raise UserError(f"cannot write {what} {path}: it is (or is inside) {name} {source}; "
                            "choose another name (an input is never overwritten)")
    if folder := model_folder_of(path.parent):
        raise UserError(f"cannot write {what} {path}: {folder} is a model or run folder; write outside it")
    if (owner := made_by(path.parent)) in FOLDER_VERBS:
        raise UserError(f"cannot write {what} {path}: {path.parent} is the output folder of `{owner}`; write "
                        "outside it")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file() or not _written_by_us(path):
            raise UserError(f"{what} {path} already exists and gpt2ft did not write it: choose another name "
                            "(it is never replaced)")
        if not overwrite:
            raise UserError(f"{what} {path} already exists (written by gpt2ft earlier): choose another name, "
                            f"or {overwrite_hint}")
    return path


def write_user_file(path: str | Path, data: str | bytes, *, overwrite: bool = False, inputs=(),
                    what: str = "output", overwrite_hint: str = "pass --overwrite to replace it") -> Path:
    """check_writable, then write atomically and record the file in its folder's ledger (so a later
    --overwrite may replace it, and nothing else)."""
    path = check_writable(path, overwrite=overwrite, inputs=inputs, what=what, overwrite_hint=overwrite_hint)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda f: f.write(raw))
    record_written(path)
    return path


def record_written(path: Path) -> None:
    """Add a file gpt2ft just wrote to its folder's ledger."""
    ledger_path = path.parent / WRITTEN_LEDGER
    try:
        ledger = json.loads(ledger_path.read_text(encoding="utf-8"))
        ledger = ledger if isinstance(ledger, dict) else {}
    except (OSError, ValueError):
        ledger = {}
    ledger[path.name] = file_digest(path)
    atomic_write_json(ledger_path, ledger, indent=None)


def refuse_overwriting_inputs(out: str | Path, inputs: dict[str, str | Path | None], flag: str = "--out") -> None:
    """`--overwrite` never clears a folder that is, holds or lies inside an input of the run (MODEL,
    --reference, --data, --lora, a draft model): a one-line refusal naming both."""
    for name, source in _existing(inputs.items()):
        if same_path(Path(out).expanduser(), source):
            raise UserError(f"{flag} {out} is, holds or lies inside {name} {source}: choose another {flag} "
                            "(an input is never overwritten)")


def _existing(inputs) -> list[tuple[str, Path]]:
    """The (name, path) inputs that are paths on disk (not Hub ids, hf: datasets or None)."""
    paths = [(name, Path(p).expanduser()) for name, p in inputs if isinstance(p, (str, Path))]
    return [(name, p) for name, p in paths if p.exists()]


# ----- reading ------------------------------------------------------------------------------------
def check_size(path: str | Path, what: str, limit: int, hint: str = "") -> int:
    """The size of a user file that is read whole; refused, naming the limit, when it is over `limit`
    bytes (so it is not parsed for minutes), missing or a folder."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what}")
    if size > limit:
        raise UserError(f"{path}: {_amount(size, '.1f')} is over the limit of {_amount(limit, 'g')} for a {what}"
                        + (f"; {hint}" if hint else ""))
    return size


def _amount(n: int, style: str) -> str:
    return f"{n / 2**20:{style}} MB" if n >= 2**20 else f"{n:,} bytes"


def read_user_text(path: str | Path, what: str = "file", limit: int = MAX_USER_FILE) -> str:
    """A small user file's text: refused with one line when missing, a folder, over `limit` bytes
    (with the limit named), unreadable, binary or not UTF-8."""
    path = Path(path).expanduser()
    check_size(path, what, limit)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # a device or a pipe has no size to check first (/dev/zero never ends)
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(raw) > limit:
        raise UserError(f"{path}: over the limit of {_amount(limit, 'g')} for a {what}")
    if b"\0" in raw:
        raise UserError(f"{path}: not a {what} (binary data)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: malformed {what} (not UTF-8 text)") from None


def read_json(path: Path, what: str = "file", limit: int | None = None):
    """Parsed JSON, or a UserError naming the file, the line and the problem."""
    try:
        if limit is not None:
            return json.loads(read_user_text(path, what, limit))
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed {what} ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: malformed {what} (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def check_safetensors(path: Path) -> dict:
    """Fail fast, with the reason, on a truncated file or an absurd header (before any allocation); the
    header ({name: {"dtype", "shape", "data_offsets"}}) when it is sound."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise UserError(f"{path}: malformed safetensors header (claims {n} bytes, file has {size}); "
                            "the file is truncated or not safetensors: download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: malformed safetensors header (not JSON); download the file again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: malformed safetensors header (not a JSON object)")
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise UserError(f"{path}: malformed safetensors header (bad tensor entries)") from None
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + end}); "
                        "download it again")
    return header


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise UserError(f"{path}: malformed safetensors file ({e})") from None


# ----- output folders -----------------------------------------------------------------------------
def made_by(folder: Path) -> str | None:
    """The verb that made `folder` (from its marker), or None."""
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8")).get("made_by"))
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(folder: str | Path, verb: str, *, overwrite: bool = False, flag: str = "--overwrite",
                     files: tuple[str, ...] = (), inputs: dict | None = None, out_flag: str = "--out") -> Path:
    """Check, before any work and without creating anything, that `verb` may write its `files` into
    `folder` (see claim_output_dir). Refused: a file, or a parent that is a file; a folder inside a model
    or run folder (a folder the same verb made, e.g. an earlier export, is its own); a non-empty folder
    gpt2ft did not make (or another verb made), unless `overwrite`, and even then one that holds a file
    of the same name as one of `files` (never replaced); a folder where one of `files` is an input; with
    `overwrite`, a folder that is, holds or lies inside one of `inputs` ({name: path})."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{out_flag} {folder} is a file, not a folder: choose another output folder")
    _check_parents(folder, out_flag)
    owner = made_by(folder) if folder.exists() else None
    model = model_folder_of(folder)
    if model is not None and not (model == folder.absolute() and owner == verb):
        raise UserError(f"{out_flag} {folder}: {model} is a model or run folder; write outside it")
    for label, source in _existing((inputs or {}).items()):
        if any((folder / name).exists() and (folder / name).resolve() == source.resolve() for name in files):
            raise UserError(f"{out_flag} {folder} holds {label} {source}, which `{verb}` would replace; "
                            f"choose another {out_flag}")
    if overwrite:
        refuse_overwriting_inputs(folder, inputs or {}, out_flag)
    if folder.exists() and any(folder.iterdir()) and owner != verb:
        if owner:  # each verb reads its own folders back (a tokenizer, prepared data): never mixed
            raise UserError(f"{folder} was made by `{owner}`; choose another folder (not even {flag} lets one "
                            "gpt2ft verb write into another's)")
        clashing = [name for name in files if (folder / name).exists() or (folder / name).is_symlink()]
        if not overwrite and not clashing:
            raise UserError(f"{folder} is not empty and was not made by gpt2ft; choose a new folder, or pass {flag} "
                            "to write beside what is there (nothing of yours is replaced or deleted)")
        if clashing and owner is None:
            raise UserError(f"{folder} holds {', '.join(clashing)}, which `{verb}` would replace, and gpt2ft did "
                            f"not make the folder: {flag} never replaces a file of yours; move them away or choose "
                            "another folder")
    return folder


def claim_output_dir(folder: str | Path, verb: str, *, overwrite: bool = False, flag: str = "--overwrite",
                     files: tuple[str, ...] = (), inputs: dict | None = None) -> Path:
    """Make `folder` an output folder of `verb` (e.g. "gpt2ft export"), after check_output_dir.

    An absent or empty folder is created and marked. A folder already made by the same verb is
    reused. A non-empty folder that gpt2ft did not make (or another verb made) is refused unless
    `overwrite`, which only allows writing beside what is there: nothing is ever deleted here.
    """
    folder = check_output_dir(folder, verb, overwrite=overwrite, flag=flag, files=files, inputs=inputs)
    owner = made_by(folder) if folder.exists() else None
    make_dir(folder)
    if owner != verb:
        atomic_write_json(folder / OUTPUT_MARKER, {"made_by": verb})
    return folder


def make_dir(folder: Path) -> None:
    if Path(folder).is_symlink() and not Path(folder).exists():  # mkdir would say "File exists"
        raise UserError(f"cannot create {folder}: it is a symbolic link to {os.readlink(folder)}, which does not "
                        "exist (or loops); remove the link or choose another folder")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None


@contextlib.contextmanager
def output_dir(folder: str | Path, verb: str, *, overwrite: bool = False, flag: str = "--overwrite",
               files: tuple[str, ...] = (), inputs: dict | None = None):
    """claim_output_dir for the length of a `with`. If the body fails before writing anything, nothing
    is left behind: a folder it created is removed, a marker it added to a folder of the user's is taken
    back. If it succeeds, those of `files` that an earlier run of the verb left and this one did not write
    again are removed (an old word vocabulary beside a new BPE one would be loaded instead of it; an old
    report would describe another evaluation)."""
    path = Path(folder).expanduser()
    existed, ours = path.exists(), path.is_dir() and made_by(path) == verb
    before = {p.name for p in path.iterdir()} if path.is_dir() else set()
    identities = {name: _identity(path / name) for name in files if (path / name).is_file()}
    wrote = _wrote(path) if ours else None  # None: a marker of an older gpt2ft, which recorded no files
    # a file of the verb's names that it did not write, or that was changed since: the user's
    theirs = [n for n in identities if ours and wrote is not None and wrote.get(n) != list(identities[n])]
    if theirs and not overwrite:
        name = theirs[0]
        raise UserError(f"{path / name} was {'changed' if name in wrote else 'put there'} since {verb} wrote {path}; "
                        f"{flag} replaces it (move it away first to keep it)")
    earlier = {name: identity for name, identity in identities.items() if ours and name not in theirs}
    path = claim_output_dir(folder, verb, overwrite=overwrite, flag=flag, files=files, inputs=inputs)
    try:
        yield path
    except BaseException:
        if not ours and {p.name for p in path.iterdir()} == before | {OUTPUT_MARKER}:
            (path / OUTPUT_MARKER).unlink()
            if not existed:
                path.rmdir()
        raise
    for name, identity in earlier.items():
        if _identity(path / name) == identity:
            (path / name).unlink()
    now = {name: _identity(path / name) for name in files if (path / name).is_file()}
    written = {name: list(identity) for name, identity in now.items() if identity != identities.get(name)}
    atomic_write_json(path / OUTPUT_MARKER, {"made_by": verb, "wrote": written})  # what the next run may replace


def _wrote(folder: Path) -> dict | None:
    """The files (name -> identity) the last run of the folder's verb wrote, from its marker."""
    try:
        wrote = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8")).get("wrote")
    except (OSError, ValueError, AttributeError):
        return None
    return wrote if isinstance(wrote, dict) else None


def _identity(path: Path) -> tuple | None:
    """What tells a file from the one an atomic write puts in its place."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same place (or one lies inside the other)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents
