"""OpenAI's TensorFlow GPT-2 release (`gpt2/355M/`: checkpoint, hparams.json, model.ckpt.index,
model.ckpt.data-00000-of-00001, encoder.json, vocab.bpe), read without TensorFlow.

A TF checkpoint is a tensor bundle: PREFIX.index is a LevelDB-style SSTable whose empty key holds a
BundleHeaderProto and every other key (a variable name) a BundleEntryProto saying where that
variable's raw little-endian bytes lie in PREFIX.data-0000S-of-0000N. Both protobufs are parsed here
by hand; every length and offset is checked before it is used, so a damaged file is one UserError.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import GPTConfig
from .errors import UserError
from .fileio import read_json
from .tokenizer import BPETokenizer, _read_json, _read_merges, gpt2_tokenizer

HPARAMS = "hparams.json"
CHECKPOINT_STATE = "checkpoint"
DEFAULT_PREFIX = "model.ckpt"
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48  # two BlockHandles padded to 40 bytes, then the 8-byte magic
MAX_INDEX_BYTES = 64 * 2**20  # GPT-2's index is a few kB: anything near this is not an index
# TF DataType enum -> (numpy dtype of the raw bytes, torch dtype to view them as)
DTYPES = {1: (np.float32, torch.float32), 2: (np.float64, torch.float64),
          19: (np.float16, torch.float16), 14: (np.uint16, torch.bfloat16)}
# Variables a TF training run saves beside the weights: optimizer slots, step counters, TF2's object graph.
TRAINING_STATE = re.compile(r"(.*/Adam(_\d+)?|beta[12]_power(_\d+)?|global_step|_CHECKPOINTABLE_OBJECT_GRAPH)")


class _Corrupt(Exception):
    """A malformed byte range; read_bundle_index turns it into a UserError naming the file."""


# ----- bytes: varints, protobuf fields, crc32c, snappy -----------------------------------------
def _varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    end = len(buf) if end is None else end
    value = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("a varint runs past the end of its block")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise _Corrupt("a varint is longer than 10 bytes")


def _take(buf: bytes, pos: int, n: int, end: int | None = None) -> tuple[bytes, int]:
    end = len(buf) if end is None else end
    if n < 0 or pos + n > end:
        raise _Corrupt(f"a field of {n} bytes runs past the end of its block")
    return buf[pos:pos + n], pos + n


def _fields(msg: bytes):
    """(field number, value) of a protobuf message: ints for varint/fixed fields, bytes for the rest."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
        elif wire in (1, 5):
            raw, pos = _take(msg, pos, 8 if wire == 1 else 4)
            value = int.from_bytes(raw, "little")
        elif wire == 2:
            n, pos = _varint(msg, pos)
            value, pos = _take(msg, pos, n)
        else:
            raise _Corrupt(f"protobuf wire type {wire} is not used by tensor bundles")
        yield field, value


def _int(value) -> int:
    if not isinstance(value, int):
        raise _Corrupt("a protobuf field that should be a number is bytes")
    return value


def _msg(value) -> bytes:
    if not isinstance(value, bytes):
        raise _Corrupt("a protobuf field that should be a message is a number")
    return value


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(crc: int) -> int:
    """LevelDB's stored form of a crc (rotated and offset, so a crc of crcs does not look like data)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def snappy_decompress(data: bytes) -> bytes:
    """Snappy's raw block format: the decompressed length, then literals and back-references."""
    size, pos = _varint(data, 0)
    if size > 16 * len(data) + 64:  # snappy never expands by more than this; refuse before allocating
        raise _Corrupt(f"snappy block claims {size} bytes from {len(data)}")
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal: length-1 in the tag, or in the 1-4 bytes after it
            n = tag >> 2
            if n >= 60:
                raw, pos = _take(data, pos, n - 59)
                n = int.from_bytes(raw, "little")
            chunk, pos = _take(data, pos, n + 1)
            out += chunk
            continue
        if kind == 1:
            raw, pos = _take(data, pos, 1)
            length, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | raw[0]
        else:
            raw, pos = _take(data, pos, 2 if kind == 2 else 4)
            length, offset = (tag >> 2) + 1, int.from_bytes(raw, "little")
        if not 0 < offset <= len(out):
            raise _Corrupt(f"snappy copy reaches {offset} bytes back with {len(out)} written")
        for _ in range(length):  # byte by byte: a copy may overlap what it writes
            out.append(out[-offset])
    if len(out) != size:
        raise _Corrupt(f"snappy block decompressed to {len(out)} bytes, header says {size}")
    return bytes(out)


# ----- the SSTable (.index file) --------------------------------------------------------------
def _block_handle(buf: bytes, pos: int = 0, end: int | None = None) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos, end)
    size, pos = _varint(buf, pos, end)
    return (offset, size), pos


def _read_block(data: bytes, handle: tuple[int, int]) -> bytes:
    """A block's contents, its crc checked and Snappy undone; each block is followed by type + crc."""
    offset, size = handle
    limit = len(data) - FOOTER_BYTES
    if offset + size + 5 > limit:
        raise _Corrupt(f"a block at {offset} of {size} bytes runs past the end of the file ({len(data)} bytes)")
    contents, kind = data[offset:offset + size], data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if masked_crc(crc32c(contents + bytes([kind]))) != stored:
        raise _Corrupt(f"the block at byte {offset} fails its crc32c check (the file is damaged)")
    if kind == 0:
        return contents
    if kind == 1:
        return snappy_decompress(contents)
    raise _Corrupt(f"unknown block compression type {kind}")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of a block: prefix-compressed keys, then the restart array."""
    if len(block) < 4:
        raise _Corrupt("a block is shorter than its restart count")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise _Corrupt(f"a block of {len(block)} bytes claims {restarts} restart points")
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = _varint(block, pos, end)
        unshared, pos = _varint(block, pos, end)
        length, pos = _varint(block, pos, end)
        if shared > len(key):
            raise _Corrupt(f"a key shares {shared} bytes with a previous key of {len(key)}")
        suffix, pos = _take(block, pos, unshared, end)
        value, pos = _take(block, pos, length, end)
        key = key[:shared] + suffix
        entries.append((key, value))
    return entries


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable held in `data`, in file order."""
    if len(data) < FOOTER_BYTES:
        raise _Corrupt(f"{len(data)} bytes is shorter than the {FOOTER_BYTES}-byte footer")
    footer = data[-FOOTER_BYTES:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise _Corrupt("the footer lacks the table magic number (not a TensorFlow checkpoint index, or truncated)")
    _, pos = _block_handle(footer, 0, 40)  # the metaindex: bundles keep nothing there
    index_handle, _ = _block_handle(footer, pos, 40)
    entries = []
    for _, handle in _block_entries(_read_block(data, index_handle)):
        block_handle, used = _block_handle(handle)
        if used != len(handle):
            raise _Corrupt("an index entry is not a block handle")
        entries += _block_entries(_read_block(data, block_handle))
    return entries


# ----- the tensor bundle ----------------------------------------------------------------------
@dataclass
class TensorEntry:
    """Where one variable's bytes lie: BundleEntryProto's dtype, shape, shard_id, offset, size, crc32c."""

    dtype: int
    shape: tuple[int, ...]
    shard: int = 0
    offset: int = 0
    size: int = 0
    crc: int | None = None
    sliced: bool = False


def _parse_shape(msg: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _fields(msg):
        if field == 2:  # TensorShapeProto.dim: Dim {1: size}
            size = _int(next((v for f, v in _fields(_msg(value)) if f == 1), 0))
            dims.append(size - 2**64 if size >= 2**63 else size)
        elif field == 3 and value:
            raise _Corrupt("a tensor shape of unknown rank")
    if any(d < 0 for d in dims):
        raise _Corrupt(f"a tensor shape with a negative dimension {dims}")
    return tuple(dims)


def _parse_entry(value: bytes) -> TensorEntry:
    entry = TensorEntry(dtype=0, shape=())
    for field, v in _fields(value):
        if field == 1:
            entry.dtype = _int(v)
        elif field == 2:
            entry.shape = _parse_shape(_msg(v))
        elif field == 3:
            entry.shard = _int(v)
        elif field == 4:
            entry.offset = _int(v)
        elif field == 5:
            entry.size = _int(v)
        elif field == 6:
            entry.crc = _int(v)
        elif field == 7:
            entry.sliced = True
    return entry


def read_bundle_index(path: Path) -> tuple[int, dict[str, TensorEntry]]:
    """(number of data shards, variable name -> TensorEntry) of a .index file; damage is one UserError."""
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise UserError(f"{path}: {size} bytes is over the {MAX_INDEX_BYTES} limit for a TensorFlow "
                            "checkpoint index; it is not one")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the TensorFlow checkpoint index ({e.strerror or e})") from None
    try:
        shards, endian, entries = None, 0, {}
        for key, value in read_table(data):
            if key == b"":
                fields = dict(_fields(value))
                shards, endian = _int(fields.get(1, 0)), _int(fields.get(2, 0))
            else:
                entries[key.decode("utf-8")] = _parse_entry(value)
        if shards is None:
            raise _Corrupt("no bundle header (the empty key)")
    except (_Corrupt, UnicodeDecodeError, struct.error, IndexError, TypeError) as e:
        raise UserError(f"{path}: malformed TensorFlow checkpoint index ({e}); download the checkpoint "
                        "again") from None
    if endian != 0:
        raise UserError(f"{path}: the checkpoint was written big-endian; only little-endian ones are read")
    if not 1 <= shards <= 10_000:
        raise UserError(f"{path}: malformed TensorFlow checkpoint index (header says {shards} data shards)")
    return shards, entries


def data_file(prefix: Path, shard: int, shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}")


def _data_crc():
    """A fast crc32c where google-crc32c (C) is installed; without it tensor data is checked by size only
    (crc32c in pure Python would take minutes for a GB)."""
    try:
        from google_crc32c import value
    except ImportError:
        return None
    return value


def _read_tensor(path: Path, name: str, e: TensorEntry, verify: bool) -> torch.Tensor:
    raw_dtype, dtype = DTYPES[e.dtype]
    with open(path, "rb") as f:
        f.seek(e.offset)
        raw = f.read(e.size)
    if len(raw) != e.size:
        raise UserError(f"{path}: truncated (variable {name} needs bytes up to {e.offset + e.size}); "
                        "download the checkpoint again")
    crc = _data_crc() if verify and e.crc is not None else None
    if crc is not None and masked_crc(crc(raw)) != e.crc:
        raise UserError(f"{path}: variable {name} is damaged (its crc32c differs from the one in the index); "
                        "download the checkpoint again")
    array = np.frombuffer(raw, dtype=np.dtype(raw_dtype).newbyteorder("<")).astype(raw_dtype)  # a writable copy
    return torch.from_numpy(array).view(dtype).reshape(e.shape)


def read_bundle(prefix: str | Path, names=None, verify: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of the bundle at PREFIX (PREFIX.index + PREFIX.data-*): all of them, or just `names`;
    with verify, each one's crc32c is checked where google-crc32c is installed."""
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    shards, entries = read_bundle_index(index)
    sizes: dict[int, int] = {}
    out = {}
    for name in entries if names is None else names:
        where = f"{index}: variable {name}"
        if name not in entries:
            raise UserError(f"{where} is not in the checkpoint")
        e = entries[name]
        if e.sliced:
            raise UserError(f"{where} is saved as partitioned slices, which are not supported")
        if e.dtype not in DTYPES:
            raise UserError(f"{where} has TensorFlow dtype {e.dtype}; only float32, float64, float16 and "
                            "bfloat16 are read")
        count = int(np.prod(e.shape, dtype=np.int64))
        if e.size != count * np.dtype(DTYPES[e.dtype][0]).itemsize or e.shard >= shards:
            raise UserError(f"{where}: malformed entry ({e.size} bytes in shard {e.shard} of {shards} for "
                            f"shape {list(e.shape)}); download the checkpoint again")
        path = data_file(prefix, e.shard, shards)
        if e.shard not in sizes:
            sizes[e.shard] = path.stat().st_size if path.is_file() else -1
        if sizes[e.shard] < 0:
            raise UserError(f"{path}: missing (the data of {index}); copy the whole checkpoint folder")
        if e.offset + e.size > sizes[e.shard]:
            raise UserError(f"{path}: truncated ({sizes[e.shard]} bytes, variable {name} needs bytes up to "
                            f"{e.offset + e.size}); download the checkpoint again")
        out[name] = _read_tensor(path, name, e, verify)
    return out


# ----- OpenAI's GPT-2 folder ------------------------------------------------------------------
def _prefix_from_state(folder: Path) -> Path | None:
    """The prefix named by a `checkpoint` file (TF's text proto), preferring one inside `folder`."""
    state = folder / CHECKPOINT_STATE
    if not state.is_file() or state.stat().st_size > 1 << 20:
        return None
    found = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(errors="replace"), re.MULTILINE)
    if not found:
        return None
    named = Path(found.group(1))
    inside = folder / named.name  # a copied folder's `checkpoint` may still name where it was written
    return inside if (folder / (named.name + ".index")).is_file() else folder / named


def checkpoint_prefix(folder: Path) -> Path:
    named = _prefix_from_state(folder)
    prefix = named or folder / DEFAULT_PREFIX
    if not prefix.with_name(prefix.name + ".index").is_file():
        why = f"the prefix {folder / CHECKPOINT_STATE} names" if named else "the default prefix"
        raise UserError(f"{folder}: no TensorFlow checkpoint index {prefix}.index ({why}); copy the whole "
                        "checkpoint folder")
    return prefix


def is_tf_gpt2_folder(folder: str | Path) -> bool:
    """A folder as OpenAI released GPT-2: hparams.json and a TF checkpoint (model.ckpt.index, or a
    `checkpoint` file naming its prefix)."""
    folder = Path(folder)
    if not (folder / HPARAMS).is_file():
        return False
    return (folder / (DEFAULT_PREFIX + ".index")).is_file() or _prefix_from_state(folder) is not None


def read_hparams(folder: Path) -> GPTConfig:
    """hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer) as a GPTConfig (dropout 0.1, as HF's)."""
    path = folder / HPARAMS
    hp = read_json(path, "GPT-2 hyperparameters file", limit=1 << 20)
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    if not isinstance(hp, dict):
        raise UserError(f"{path}: malformed GPT-2 hyperparameters (not a JSON object)")
    bad = [k for k in keys if not isinstance(hp.get(k), int) or isinstance(hp.get(k), bool)]
    if bad:
        raise UserError(f"{path}: {', '.join(bad)} must be integers (OpenAI's hparams.json has {', '.join(keys)})")
    try:
        return GPTConfig(n_layer=hp["n_layer"], n_head=hp["n_head"], n_embd=hp["n_embd"], block_size=hp["n_ctx"],
                         vocab_size=hp["n_vocab"], dropout=0.1)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def tf_names(cfg: GPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """OpenAI's variable name -> (HF GPT2LMHeadModel name, shape in the TF checkpoint)."""
    d, out = cfg.n_embd, {}
    out["model/wte"] = ("transformer.wte.weight", (cfg.vocab_size, d))
    out["model/wpe"] = ("transformer.wpe.weight", (cfg.block_size, d))
    layers = {"ln_1": (d, None), "attn/c_attn": (d, 3 * d), "attn/c_proj": (d, d), "ln_2": (d, None),
              "mlp/c_fc": (d, 4 * d), "mlp/c_proj": (4 * d, d)}
    for i in range(cfg.n_layer):
        for part, (n_in, n_out) in layers.items():
            hf = f"transformer.h.{i}.{part.replace('/', '.')}"
            if n_out is None:  # LayerNorm: g (gain) and b
                out[f"model/h{i}/{part}/g"] = (hf + ".weight", (d,))
                out[f"model/h{i}/{part}/b"] = (hf + ".bias", (d,))
            else:  # a 1x1 convolution: w (1, in, out) is HF's Conv1D weight with a leading 1
                out[f"model/h{i}/{part}/w"] = (hf + ".weight", (1, n_in, n_out))
                out[f"model/h{i}/{part}/b"] = (hf + ".bias", (n_out,))
    out["model/ln_f/g"] = ("transformer.ln_f.weight", (d,))
    out["model/ln_f/b"] = ("transformer.ln_f.bias", (d,))
    return out


def read_tf_gpt2(folder: str | Path, verify: bool = True) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and HF-named state dict of OpenAI's TF GPT-2 folder; missing, unexpected and
    mis-shaped variables are reported by name; verify: check each variable's crc32c (read_bundle)."""
    folder = Path(folder)
    cfg = read_hparams(folder)
    prefix = checkpoint_prefix(folder)
    index = prefix.with_name(prefix.name + ".index")
    _, entries = read_bundle_index(index)
    expected = tf_names(cfg)
    present = {n for n in entries if not TRAINING_STATE.fullmatch(n)}
    problems = []
    if missing := sorted(set(expected) - present):
        problems.append(f"missing variables {_names(missing)}")
    if unexpected := sorted(present - set(expected)):
        problems.append(f"unexpected variables {_names(unexpected)}")
    for name in sorted(set(expected) & present):
        if entries[name].shape != expected[name][1]:
            problems.append(f"{name}: shape {list(entries[name].shape)}, {HPARAMS} implies {list(expected[name][1])}")
    if problems:
        raise UserError(f"{index}: not the GPT-2 that {folder / HPARAMS} describes: " + "; ".join(problems[:6]))
    tensors = read_bundle(prefix, sorted(expected), verify)
    state = {}
    for name, (hf, shape) in expected.items():
        state[hf] = tensors[name][0] if len(shape) == 3 else tensors[name]  # squeeze the conv's width of 1
    return cfg, state


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def tf_tokenizer(folder: str | Path) -> BPETokenizer:
    """The folder's encoder.json + vocab.bpe (GPT-2's BPE when they are GPT-2's own or absent)."""
    folder = Path(folder)
    encoder, merges_file = folder / "encoder.json", folder / "vocab.bpe"
    if not encoder.is_file() and not merges_file.is_file():
        return gpt2_tokenizer()
    for path in (encoder, merges_file):
        if not path.is_file():
            raise UserError(f"{path}: missing (OpenAI's GPT-2 folders hold encoder.json and vocab.bpe together)")
    try:
        vocab, merges = _read_json(encoder), _read_merges(merges_file)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{merges_file}: cannot read the BPE merges ({e})") from None
    if vocab == gpt2_tokenizer().vocab and merges == gpt2_tokenizer().merges:
        return gpt2_tokenizer()
    return BPETokenizer(vocab, merges, name=folder.name)
