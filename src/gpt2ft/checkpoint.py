"""Loading and saving weights: HF hub ids, HF folders, gpt2ft checkpoints and run folders.

A gpt2ft checkpoint is an HF-format folder (config.json, model.safetensors, tokenizer files,
generation_config.json) plus gpt2ft.json (our metadata: prompt template, base model, step) and,
for training runs, trainer_state.pt. Every write is atomic, and a checkpoint counts only once its
COMPLETE marker, written last, exists.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import OptionError, UserError
from .fileio import (atomic_save_safetensors, atomic_write_json, atomic_write_text, check_output_dir, file_digest,
                     fsync_dir, load_safetensors, output_dir, read_json, same_path)
from .lora import LoRAConfig, adapter_state_dict, apply_lora, config_from_peft, load_adapter_state, peft_config
from .model import GPT
from .templates import TEMPLATE_KEY, as_template, exported_template
from .tf_checkpoint import is_tf_gpt2_folder, read_tf_gpt2, tf_tokenizer
from .tokenizer import TOKENIZER_FILES, Tokenizer, has_tokenizer_files, load_tokenizer

COMPLETE = "COMPLETE"
META_FILE = "gpt2ft.json"
TRAIN_STATE_FILE = "trainer_state.pt"
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints/step-N: the rest of a run folder's layout is train/run_folder.py
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
             ADAPTER_CONFIG, META_FILE]
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md", *TOKENIZER_FILES)


# ----- reading weights ------------------------------------------------------------------------
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


def to_hf_state_dict(model: GPT, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Our weights (the model's, or `state`: its state dict gathered from shards) under HF names and
    layouts (Conv1D weights are (in, out)); lm_head is tied."""
    out = {}
    for name, tensor in (model.state_dict() if state is None else state).items():
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
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p)]
    return sorted(steps, key=lambda p: p.name, reverse=True)


def verify_checkpoint(folder: Path, hashes: bool = True) -> str | None:
    """None if every file the COMPLETE marker lists is present with its size (and hash), else the reason."""
    marker = folder / COMPLETE
    if not marker.exists():
        return f"no {COMPLETE} marker"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE} marker"
    for name, info in files.items():
        p = folder / name
        if not p.exists():
            return f"{name} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {info['bytes']}"
        if hashes and file_digest(p) != info["sha256"]:
            return f"{name} is damaged (its sha256 hash differs from the one recorded at save time)"
    return None


def resolve(ref: str | os.PathLike, verify: bool = True) -> Path:
    """A folder holding the model: a local HF/gpt2ft folder, a run's newest intact checkpoint, or a Hub
    snapshot. gpt2ft checkpoints are checked against their COMPLETE marker (sizes always, sha256 unless
    verify=False); a run whose newest checkpoint is damaged falls back to the newest intact one."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "config.json").exists() or (path / ADAPTER_CONFIG).exists():
            if (path / META_FILE).exists():
                problem = verify_checkpoint(path, hashes=verify)
                if problem:
                    raise UserError(f"{path}: {problem}; use another checkpoint (or --no-verify to load it anyway)")
            return path
        if is_tf_gpt2_folder(path):  # OpenAI's TensorFlow release, e.g. gpt2/355M/
            return path
        if (path / CHECKPOINTS_DIR).is_dir():
            found = run_checkpoints(path)
            for i, folder in enumerate(found):
                problem = verify_checkpoint(folder, hashes=verify)
                if problem is None:
                    return folder
                print(f"warning: skipping {folder}: {problem}", file=sys.stderr)
            raise UserError(f"{path}: run folder has no {'intact' if found else 'complete'} checkpoint yet")
        raise UserError(f"{path}: not a model folder (no config.json, nor OpenAI's hparams.json + model.ckpt) "
                        "nor a gpt2ft run folder")
    ref = str(ref)
    if path.exists():  # a file (a .gguf, a .safetensors): a model is a folder
        raise UserError(f"{ref}: is a file; give the folder that holds the model (its config.json)")
    if ref.startswith((".", "/", "~")) or ref.endswith("/") or ref.count("/") > 1 or os.sep in ref.replace("/", ""):
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
        if not any(folder.glob("*.safetensors")) and not (folder / ADAPTER_CONFIG).exists():
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES + ["pytorch_model.bin"]))
        return folder
    except LocalEntryNotFoundError:
        raise UserError(f"model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
                        f"reached (offline or HF_HUB_OFFLINE=1): {how}") from None
    except Exception as e:  # network errors, unknown repos, auth
        raise UserError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): {how}") from None


def model_ref(ref: str | os.PathLike) -> str:
    """How a model is recorded in files: a local folder as an absolute path, a Hub id as is."""
    path = Path(ref).expanduser()
    return os.path.abspath(path) if path.exists() else str(ref)


def read_meta(folder: Path) -> dict:
    p = folder / META_FILE
    if not p.exists():
        return {}
    meta = read_json(p, "gpt2ft metadata")
    if not isinstance(meta, dict):
        raise UserError(f"{p}: malformed gpt2ft metadata (not a JSON object)")
    return meta


def read_config(folder: Path) -> GPTConfig:
    p = folder / "config.json"
    data = read_json(p, "model config")
    if not isinstance(data, dict):
        raise UserError(f"{p}: malformed model config (not a JSON object)")
    return GPTConfig.from_hf(data, source=str(p))


# ----- adapters (PEFT format) -----------------------------------------------------------------
def write_adapter_files(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict, state: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT), tokenizer, and gpt2ft.json naming the base."""
    atomic_write_json(folder / ADAPTER_CONFIG, peft_config(model.lora_config, meta.get("base_model")))
    atomic_save_safetensors(adapter_state_dict(model, state), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    tokenizer.save(folder)
    atomic_write_json(folder / META_FILE, {"format": 1, **meta, "lora": asdict(model.lora_config)})


def read_adapter_config(folder: Path) -> LoRAConfig:
    path = folder / ADAPTER_CONFIG
    data = read_json(path, "adapter config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: malformed adapter config (not a JSON object)")
    return config_from_peft(data, str(path))


def load_adapter_weights(model: GPT, folder: Path) -> None:
    load_adapter_state(model, load_safetensors(folder / ADAPTER_WEIGHTS), str(folder / ADAPTER_WEIGHTS))


def attach_adapter(model: GPT, folder: Path) -> None:
    """Apply the adapter saved in `folder` on top of `model`."""
    if not (folder / ADAPTER_CONFIG).exists():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; not a LoRA adapter folder")
    apply_lora(model, read_adapter_config(folder))
    load_adapter_weights(model, folder)


def _adapter_base(folder: Path, meta: dict) -> str:
    """The base model an adapter-only folder names (absolute, or relative to the folder itself)."""
    base = meta.get("base_model") or read_json(folder / ADAPTER_CONFIG, "adapter config").get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder}: adapter folder does not name its base model; pass the base as MODEL "
                        f"and --lora {folder}")
    beside = folder / base
    if not Path(base).is_absolute() and beside.exists():
        return str(beside)
    if Path(base).is_absolute() and not Path(base).exists():
        raise UserError(f"{folder}: its base model {base} is gone (a checkpoint rotated away or moved?); pass the "
                        f"base as MODEL and --lora {folder}")
    return base


# ----- loading --------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What load() returns: unpacks as `model, tokenizer = load(...)`; also carries the folder it came
    from, the reference as recorded in files, gpt2ft's metadata and the prompt template."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    source: Path
    ref: str

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def template(self):
        """The prompt template it was tuned with (a templates.Template), or None."""
        return as_template(self.meta.get("template"))

    @property
    def base_ref(self) -> str:
        """What a run trained from this model records as its base: a LoRA model's own base, else this model: a
        local one as the very checkpoint folder it loaded (a run folder's newest checkpoint changes as it trains)."""
        if self.meta.get("lora"):
            return self.meta["base_model"]
        return os.path.realpath(self.source) if Path(self.ref).exists() else self.ref


def load(ref_or_path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         lora: str | None = None, verify: bool = True) -> LoadedModel:
    """The model from a Hub id, HF folder, gpt2ft checkpoint, run folder or LoRA adapter folder."""
    from .runtime import resolve_device, resolve_dtype

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype {dtype} is not one a model computes in: float32, bfloat16 or float16")
    folder = resolve(ref_or_path, verify)
    meta = read_meta(folder)
    if "template" not in meta and (template := exported_template(folder)) is not None:
        meta = {**meta, "template": template}  # an exported folder keeps the template it was tuned with
    if (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists():
        base = load(_adapter_base(folder, meta), verify=verify)  # an adapter-only folder: base + adapter
        model = base.model
        attach_adapter(model, folder)
        tokenizer = load_tokenizer(folder) if has_tokenizer_files(folder) else base.tokenizer
    elif is_tf_gpt2_folder(folder) and not (folder / "config.json").exists():
        config, state = read_tf_gpt2(folder, verify=verify)
        model = GPT(config)
        load_hf_state_dict(model, state, str(folder))
        tokenizer = tf_tokenizer(folder)
    else:
        model = GPT(read_config(folder))
        load_hf_state_dict(model, read_weights(folder), str(folder))
        tokenizer = load_tokenizer(folder if has_tokenizer_files(folder) else None)  # none saved: GPT-2's
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{model.config.vocab_size} embeddings; the folder mixes files of two models")
    if model.config.vocab_size - tokenizer.vocab_size >= 64:  # more than padding to a multiple of 64
        raise UserError(f"{folder}: the model has {model.config.vocab_size} embeddings but its tokenizer only "
                        f"{tokenizer.vocab_size} ids, so generated ids could not be decoded; the folder mixes "
                        "files of two models")
    if lora and model.lora_config is not None:  # the adapter's layers are wrapped already
        raise OptionError("lora", lambda n: f"{n('lora')} {lora}: {folder} already carries a LoRA adapter and one "
                          "model takes one: merge it first (gpt2ft export --merge-lora) or pass its base model")
    if lora:
        attach_adapter(model, resolve(lora, verify))
    model.to(device=device, dtype=dtype)
    model.eval()
    return LoadedModel(model, tokenizer, meta, folder, model_ref(ref_or_path))


# ----- saving ---------------------------------------------------------------------------------
def write_model_files(folder: Path, model: GPT, tokenizer, meta: dict | None, dtype=None, template=None,
                      state: dict | None = None) -> None:
    """Write an HF-format model folder (no marker): config, weights (the model's, or `state`), tokenizer,
    generation config.
    tokenizer_config.json gets the real context as model_max_length and the prompt template (from
    `template`, else the one `meta` records) as a Jinja chat_template."""
    cfg = model.config
    hf = cfg.to_hf()
    state = to_hf_state_dict(model, state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_write_json(folder / "config.json", hf)
    atomic_save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "generation_config.json",
                      {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                       "pad_token_id": cfg.eos_token_id})
    tokenizer.save(folder)
    _complete_tokenizer_config(folder / "tokenizer_config.json", cfg.block_size,
                               template or as_template((meta or {}).get("template")))
    if meta is not None:
        atomic_write_json(folder / META_FILE, meta)


def _complete_tokenizer_config(path: Path, context: int, template) -> None:
    """The context as model_max_length (tools size prompts from it) and the template as chat_template
    (apply_chat_template then gives exactly our tokens)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model_max_length"] = context
    config["pad_token"] = config.get("eos_token")
    if template is not None:
        config["chat_template"] = template.to_jinja()
        config[TEMPLATE_KEY] = template.to_dict()  # read back by load(): a Jinja template is not parsed
    atomic_write_json(path, config)


def model_card(ref: str, model: GPT, meta: dict, template) -> str:
    """README.md of an exported folder: what it is, how it was made, its scores, how to load it."""
    cfg, lines = model.config, [f"# {Path(str(ref)).name or ref}", ""]
    lines += [f"A GPT-2 ({model.num_params() / 1e6:.1f}M parameters: {cfg.n_layer} layers, {cfg.n_head} heads, "
              f"width {cfg.n_embd}, context {cfg.block_size}) exported by gpt2ft from `{ref}`.", ""]
    facts = [("objective", meta.get("objective")), ("base model", meta.get("base_model")),
             ("prompt template", template.name if template else None), ("training step", meta.get("step")),
             ("data", meta.get("data")), ("training settings", meta.get("train_config") or meta.get("config"))]
    lines += [f"- **{k}**: `{v}`" for k, v in facts if v not in (None, "", {})]
    if scores := meta.get("scores") or meta.get("eval"):
        lines += ["", "## Evaluation", ""] + [f"- {k}: {v}" for k, v in scores.items()]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("PATH")', 'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    if template is not None:
        lines += ['ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,',
                  '                                    return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0][ids.shape[1]:]))"]
    lines += ["```", "", "or with gpt2ft: `gpt2ft chat PATH`, `gpt2ft serve PATH`.", ""]
    return "\n".join(lines)


def write_checkpoint_files(folder: Path, model: GPT, tokenizer, meta: dict, state: dict | None = None) -> None:
    """A model folder, or only the adapter files when the model trains LoRA adapters; the weights are the
    model's, or `state` (its whole state dict, gathered from the shards of a sharded model)."""
    if model.lora_config is not None:
        write_adapter_files(folder, model, tokenizer, meta, state)
    else:
        write_model_files(folder, model, tokenizer, {"format": 1, **meta}, state=state)


def restore_checkpoint_weights(model: GPT, folder: Path) -> None:
    """Load a training checkpoint's weights back into the model it was saved from (resume)."""
    if model.lora_config is not None:
        load_adapter_weights(model, folder)
    else:
        load_hf_state_dict(model, read_weights(folder), str(folder))


def commit_checkpoint(tmp: Path, final: Path) -> Path:
    """Write the COMPLETE marker (sizes and hashes of every file) into tmp, then rename tmp -> final."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != COMPLETE}
    atomic_write_text(tmp / COMPLETE, json.dumps({"files": files}, indent=1))
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


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


def export(ref: str, out: str | Path, dtype: str = "float32", merge_lora: bool = False,
           overwrite: bool = False, verify: bool = True) -> Path:
    """Write a plain HF folder (config, safetensors, tokenizer) that transformers loads as is.

    Only export's own files are written into `out` (each atomically); nothing else there is touched,
    no file of the same name that gpt2ft did not write is replaced, and `out` may not be the model
    being exported or lie inside it. `out` is checked before the model loads."""
    from .runtime import DTYPES

    if dtype not in DTYPES:
        raise OptionError("dtype", lambda n: f"{n('dtype')} must be float32, bfloat16 or float16, not {dtype!r}")
    def refuse_source(src: Path) -> None:
        if same_path(src, out):
            raise UserError(f"--out {out} is the model being exported (or inside it); choose another folder")

    claim = dict(overwrite=overwrite, files=EXPORT_FILES, inputs={"MODEL": ref})
    check_output_dir(out, "gpt2ft export", **claim)  # before the model loads
    if Path(ref).expanduser().exists():
        refuse_source(Path(ref).expanduser())
    loaded = load(ref, device="cpu", dtype="float32", verify=verify)
    model, tokenizer = loaded
    refuse_source(loaded.source)
    if model.lora_config is not None:
        if not merge_lora:
            raise UserError(f"{ref} has a LoRA adapter: pass --merge-lora to export merged weights")
        from .lora import merge_lora as merge

        merge(model)
    elif merge_lora:
        raise UserError(f"{ref} has no LoRA adapter to merge: drop --merge-lora")
    with output_dir(out, "gpt2ft export", **claim) as folder:
        write_model_files(folder, model, tokenizer, meta=None, dtype=DTYPES[dtype], template=loaded.template)
        atomic_write_text(folder / "README.md", model_card(ref, model, loaded.meta, loaded.template))
    return folder
