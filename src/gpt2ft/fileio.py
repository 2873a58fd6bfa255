"""File I/O every layer shares: atomic writes, safetensors reads with header checks, file hashes, and
output folders that say which verb made them. A leaf: it imports nothing else from gpt2ft but errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .errors import UserError

MAX_SAFETENSORS_HEADER = 100 * 2**20
OUTPUT_MARKER = ".gpt2ft-output.json"  # {"made_by": "gpt2ft VERB"}: what made a folder


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished temp folder to `final`, replacing what is there (both in the same parent)."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----- reading ------------------------------------------------------------------------------------
def read_json(path: Path, what: str = "file"):
    """Parsed JSON, or a UserError naming the file, the line and the problem."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed {what} ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: malformed {what} (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def check_safetensors(path: Path) -> None:
    """Fail fast, with the reason, on a truncated file or an absurd header (before any allocation)."""
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


def claim_output_dir(folder: str | Path, verb: str, *, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Make `folder` an output folder of `verb` (e.g. "gpt2ft export").

    An absent or empty folder is created and marked. A folder already made by the same verb is
    reused. A non-empty folder that gpt2ft did not make (or another verb made) is refused unless
    `overwrite`, which only allows writing beside what is there: nothing is ever deleted here.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder: choose another output folder")
    owner = made_by(folder) if folder.exists() else None
    if folder.exists() and any(folder.iterdir()) and owner != verb and not overwrite:
        what = f"was made by `{owner}`" if owner else "is not empty and was not made by gpt2ft"
        raise UserError(f"{folder} {what}; choose a new folder, or pass {flag} to write into it anyway "
                        "(files of the same names are replaced, others are left alone)")
    make_dir(folder)
    if owner != verb:
        atomic_write_json(folder / OUTPUT_MARKER, {"made_by": verb})
    return folder


def make_dir(folder: Path) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same place (or one lies inside the other)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents
