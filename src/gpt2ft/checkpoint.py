"""Loading and saving weights: HF hub ids, HF folders, gpt2ft checkpoints and run folders.

A gpt2ft checkpoint is an HF-format folder (config.json, model.safetensors, tokenizer files,
generation_config.json) plus gpt2ft.json (our metadata: prompt template, base model, step) and,
for training runs, trainer_state.pt. Every write is atomic, and a checkpoint counts only once its
COMPLETE marker, written last, exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import UserError
from .model import GPT

COMPLETE = "COMPLETE"
META_FILE = "gpt2ft.json"
TRAIN_STATE_FILE = "trainer_state.pt"
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
             "adapter_config.json", META_FILE]
MAX_SAFETENSORS_HEADER = 100 * 2**20


# ----- atomic file writes ---------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
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
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


# ----- reading weights ------------------------------------------------------------------------
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
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
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


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin through torch.load(weights_only=True): a pickle that runs code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickle content"
        raise UserError(f"{path}: refused to load: the pickle holds more than plain tensors ({first}); "
                        "only weights_only pickles or safetensors are accepted") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read PyTorch weights ({str(e).splitlines()[0]})") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    if (folder / "model.safetensors").exists():
        return load_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: malformed shard index ({e})") from None
        state = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        return load_pickle_weights(folder / "pytorch_model.bin")
    raise UserError(f"{folder}: no weights found (model.safetensors, model.safetensors.index.json "
                    "or pytorch_model.bin)")


# ----- HF <-> gpt2ft state dicts --------------------------------------------------------------
def _is_base_key(name: str) -> bool:
    return "lora_" not in name and name != "lm_head.weight"


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF names and layouts (Conv1D weights are (in, out)); lm_head is tied."""
    out = {}
    for name, tensor in model.state_dict().items():
        if not _is_base_key(name):
            continue
        out[name] = tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
    return out


def load_hf_state_dict(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy HF-named weights into `model`; report missing, unexpected and mis-shaped keys by name."""
    normalized = {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        if not key.startswith(("transformer.", "lm_head.")):  # GPT2Model checkpoints lack the prefix
            key = "transformer." + key
        normalized[key] = tensor
    normalized.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    own = {k: v for k, v in model.state_dict().items() if _is_base_key(k)}
    missing = sorted(set(own) - set(normalized))
    unexpected = sorted(set(normalized) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    for key in sorted(set(own) & set(normalized)):
        tensor = normalized[key]
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tensor.shape != own[key].shape:
            problems.append(f"{key}: shape {tuple(tensor.shape)} in the file, model expects {tuple(own[key].shape)}")
        normalized[key] = tensor
    if problems:
        raise UserError(f"{source}: weights do not match the model config: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(normalized[key])


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


# ----- finding a model ------------------------------------------------------------------------
def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).exists()


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p)]
    return sorted(steps, key=lambda p: p.name, reverse=True)


def resolve(model_ref: str | os.PathLike) -> Path:
    """A folder holding the model: a local HF/gpt2ft folder, a run's newest checkpoint, or a Hub snapshot."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            if (path / META_FILE).exists() and not is_complete(path):
                raise UserError(f"{path}: incomplete checkpoint (no {COMPLETE} marker); it was interrupted "
                                "while saving: use an earlier checkpoint")
            return path
        if (path / "checkpoints").is_dir():
            found = run_checkpoints(path)
            if not found:
                raise UserError(f"{path}: run folder has no complete checkpoint yet")
            return found[0]
        raise UserError(f"{path}: not a model folder (no config.json) nor a gpt2ft run folder")
    ref = str(model_ref)
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep in ref.replace("/", ""):
        raise UserError(f"{ref}: no such model folder")
    return _hub_snapshot(ref)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{repo_id} is not a local folder, and loading from the Hub needs huggingface_hub: "
                        "pip install huggingface_hub") from None
    how = (f"on a machine with internet run `hf download {repo_id}` (or huggingface-cli download) and copy "
           "the Hugging Face cache (~/.cache/huggingface) here, or pass a local folder")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").exists():
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES + ["pytorch_model.bin"]))
        return folder
    except LocalEntryNotFoundError:
        raise UserError(f"model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        f"reached (offline or HF_HUB_OFFLINE=1): {how}") from None
    except Exception as e:  # network errors, unknown repos, auth
        raise UserError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): {how}") from None


def read_meta(folder: Path) -> dict:
    p = folder / META_FILE
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: malformed metadata ({e})") from None


def read_config(folder: Path) -> GPTConfig:
    p = folder / "config.json"
    try:
        return GPTConfig.from_hf(json.loads(p.read_text()), source=str(p))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read model config ({e})") from None


def load(model_ref, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         lora: str | None = None):
    """(model, tokenizer) from a Hub id, HF folder, gpt2ft checkpoint or run folder.

    model.meta holds our metadata (prompt template, base model); model.source the folder it came from.
    """
    from .runtime import resolve_device, resolve_dtype
    from .tokenizer import load_tokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    folder = resolve(model_ref)
    meta = read_meta(folder)
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        from .lora import load_adapter_model  # an adapter-only folder: base + adapter
        model, tokenizer = load_adapter_model(folder, meta)
    else:
        model = GPT(read_config(folder))
        load_hf_state_dict(model, read_weights(folder), str(folder))
        tokenizer = load_tokenizer(folder)
    if lora:
        from .lora import attach_adapter
        attach_adapter(model, resolve(lora))
    model.meta, model.source = meta, folder
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


# ----- saving ---------------------------------------------------------------------------------
def write_model_files(folder: Path, model: GPT, tokenizer, meta: dict | None, dtype=None) -> None:
    """Write an HF-format model folder (no marker): config, weights, tokenizer, generation config."""
    cfg = model.config
    hf = cfg.to_hf()
    state = to_hf_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write_text(folder / "config.json", json.dumps(hf, indent=2))
    atomic_save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    atomic_write_text(folder / "generation_config.json", json.dumps(gen, indent=2))
    tokenizer.save(folder)
    if meta is not None:
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def commit_checkpoint(tmp: Path, final: Path) -> Path:
    """Write the COMPLETE marker (sizes and hashes of every file) into tmp, then rename tmp -> final."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != COMPLETE}
    atomic_write_text(tmp / COMPLETE, json.dumps({"files": files}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def verify_checkpoint(folder: Path) -> str | None:
    """None if every file the marker lists is present with its size and hash, else the reason."""
    marker = folder / COMPLETE
    if not marker.exists():
        return f"no {COMPLETE} marker"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return f"unreadable {COMPLETE} marker"
    for name, info in files.items():
        p = folder / name
        if not p.exists():
            return f"{name} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {info['bytes']}"
        if _file_digest(p) != info["sha256"]:
            return f"{name} does not match its recorded hash"
    return None


def save_model(folder: str | Path, model: GPT, tokenizer, meta: dict | None = None, dtype=None) -> Path:
    """Save a complete gpt2ft checkpoint at `folder` atomically (temp folder beside it, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}.", dir=folder.parent))
    try:
        write_model_files(tmp, model, tokenizer, {"format": 1, **(meta or {})}, dtype)
        return commit_checkpoint(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(model_ref: str, out: str | Path, dtype: str = "float32", merge_lora: bool = False) -> Path:
    """Write a plain HF folder (config, safetensors, tokenizer) that transformers loads as is."""
    from .runtime import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    model, tokenizer = load(model_ref, device="cpu", dtype="float32")
    if any("lora_" in k for k in model.state_dict()):
        if not merge_lora:
            raise UserError(f"{model_ref} has a LoRA adapter: pass --merge-lora to export merged weights")
        from .lora import merge_lora as merge

        merge(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}.", dir=out.parent))
    try:
        write_model_files(tmp, model, tokenizer, meta=None, dtype=DTYPES[dtype])
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
