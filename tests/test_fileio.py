"""The guarded writer for loose files and output folders, and the bounded reader (gpt2ft.fileio):
each rule on real files in a temp folder, with the bytes of everything that was there checked after."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gpt2ft.errors import UserError
from gpt2ft.fileio import (atomic_write, MAX_DATA_FILE, OUTPUT_MARKER, WRITTEN_LEDGER, check_output_dir, check_size,
                           check_writable, claim_output_dir, model_folder_of, output_dir, read_json, read_user_text,
                           refuse_overwriting_inputs, write_user_file)


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(root, call, *needles):
    """call() raises one UserError naming every needle, and no file under root changed or appeared."""
    before = files(root)
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert files(root) == before
    return str(e.value)


def a_model(folder, marker: str | None = None):
    folder.mkdir(parents=True)
    if marker:
        (folder / OUTPUT_MARKER).write_text(json.dumps({"made_by": marker}))
    else:
        (folder / "model.safetensors").write_bytes(b"weights")
    return folder


# ----- loose files -------------------------------------------------------------------------------
def test_a_new_file_is_written_atomically_recorded_and_readable_by_others(tmp_path):
    out = write_user_file(tmp_path / "sub" / "o.jsonl", "text\n")
    assert out.read_text() == "text\n"
    ledger = json.loads((tmp_path / "sub" / WRITTEN_LEDGER).read_text())
    import hashlib

    assert ledger == {"o.jsonl": hashlib.sha256(b"text\n").hexdigest()}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [WRITTEN_LEDGER, "o.jsonl"]  # no temp file
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_a_file_gpt2ft_wrote_is_replaced_only_with_overwrite(tmp_path):
    write_user_file(tmp_path / "o.md", "one")
    refused(tmp_path, lambda: write_user_file(tmp_path / "o.md", "two"), "o.md", "--overwrite")
    write_user_file(tmp_path / "o.md", b"two", overwrite=True)
    assert (tmp_path / "o.md").read_text() == "two"
    refused(tmp_path, lambda: write_user_file(tmp_path / "o.md", "3", overwrite_hint="pass --force"), "--force")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_file_is_never_replaced(tmp_path, overwrite):
    (tmp_path / "mine.md").write_text("a week of notes")
    refused(tmp_path, lambda: write_user_file(tmp_path / "mine.md", "x", overwrite=overwrite),
            "mine.md", "did not write it")


def test_a_file_changed_since_gpt2ft_wrote_it_is_the_users(tmp_path):
    write_user_file(tmp_path / "o.md", "ours")
    (tmp_path / "o.md").write_text("edited by hand")
    refused(tmp_path, lambda: write_user_file(tmp_path / "o.md", "x", overwrite=True), "did not write it")


def test_a_link_is_never_replaced(tmp_path):
    write_user_file(tmp_path / "o.md", "ours")
    (tmp_path / "link.md").symlink_to(tmp_path / "o.md")
    refused(tmp_path, lambda: write_user_file(tmp_path / "link.md", "x", overwrite=True), "link.md")


def test_parent_that_is_a_file_folder_at_the_path_and_own_record_names(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dir").mkdir()
    refused(tmp_path, lambda: check_writable(tmp_path / "notes.txt" / "o.md"), "notes.txt is a file")
    refused(tmp_path, lambda: check_writable(tmp_path / "dir", what="--out-md"), "--out-md", "is a folder")
    for name in (WRITTEN_LEDGER, OUTPUT_MARKER, ".tmp-x"):
        refused(tmp_path, lambda: check_writable(tmp_path / name), "its own records")


@pytest.mark.parametrize("kind", ["weights", "gpt2ft sft", "gpt2ft export"])
def test_never_into_a_model_or_run_folder(tmp_path, kind):
    model = a_model(tmp_path / "m", None if kind == "weights" else kind)
    for target in (model / "o.md", model / "deep" / "er" / "o.md"):
        refused(tmp_path, lambda: write_user_file(target, "x"), "model or run folder")
    assert model_folder_of(model / "deep") == model.absolute()
    (tmp_path / ".lock").write_text("")  # pytest and other tools lock folders too: not a sign of a run
    assert model_folder_of(tmp_path) is None


def test_never_onto_into_or_holding_an_input(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    refused(tmp_path, lambda: check_writable(data, overwrite=True, inputs=[data]), "the input")
    refused(tmp_path, lambda: check_writable(corpus / "o.md", inputs={"--prompts": corpus}), "--prompts")
    assert check_writable(tmp_path / "o.md", inputs=["gpt2", None, "hf:tatsu-lab/alpaca"]) == tmp_path / "o.md"


def test_refuse_overwriting_inputs_is_holds_or_inside(tmp_path):
    (tmp_path / "run" / "best").mkdir(parents=True)
    for out in (tmp_path / "run", tmp_path, tmp_path / "run" / "best" / "x"):
        refused(tmp_path, lambda: refuse_overwriting_inputs(out, {"MODEL": tmp_path / "run"}), "MODEL")
    refuse_overwriting_inputs(tmp_path / "other", {"MODEL": tmp_path / "run", "--lora": None, "--ref": "gpt2"})


# ----- output folders ------------------------------------------------------------------------------
def test_output_folder_claimed_reused_and_refused(tmp_path):
    out = claim_output_dir(tmp_path / "o", "gpt2ft prepare")
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {"made_by": "gpt2ft prepare"}
    (out / "meta.json").write_text("{}")
    assert claim_output_dir(out, "gpt2ft prepare") == out  # its own: reused
    refused(tmp_path, lambda: claim_output_dir(out, "gpt2ft export"), "made by `gpt2ft prepare`")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    refused(tmp_path, lambda: claim_output_dir(tmp_path / "user", "gpt2ft eval"), "--overwrite")
    refused(tmp_path, lambda: claim_output_dir(tmp_path / "user" / "notes.txt", "gpt2ft eval"), "is a file")
    refused(tmp_path, lambda: claim_output_dir(tmp_path / "user" / "notes.txt" / "o", "gpt2ft eval"), "is a file")


def test_overwrite_writes_beside_a_users_files_but_never_over_them(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    claim_output_dir(user, "gpt2ft eval", overwrite=True, files=("summary.json",))
    assert (user / "notes.txt").read_text() == "mine"
    (user / "summary.json").write_text("mine too")
    (user / OUTPUT_MARKER).unlink()
    refused(tmp_path, lambda: claim_output_dir(user, "gpt2ft eval", overwrite=True, files=("summary.json",)),
            "summary.json", "never replaces a file of yours")


def test_output_folder_inside_a_model_is_refused_but_an_earlier_export_is_reused(tmp_path):
    model = a_model(tmp_path / "m")
    refused(tmp_path, lambda: check_output_dir(model / "eval", "gpt2ft eval"), "model or run folder")
    refused(tmp_path, lambda: check_output_dir(model, "gpt2ft export", overwrite=True), "model or run folder")
    exported = claim_output_dir(tmp_path / "e", "gpt2ft export")
    (exported / "model.safetensors").write_bytes(b"w")
    assert check_output_dir(exported, "gpt2ft export") == exported
    refused(tmp_path, lambda: check_output_dir(exported / "sub", "gpt2ft export"), "model or run folder")


def test_output_folder_whose_file_is_an_input(tmp_path):
    report = claim_output_dir(tmp_path / "r", "gpt2ft eval")
    (report / "summary.json").write_text("[]")
    refused(tmp_path, lambda: check_output_dir(report, "gpt2ft eval", files=("summary.json",),
                                               inputs={"--data": report / "summary.json"}), "--data")
    refused(tmp_path, lambda: check_output_dir(tmp_path, "gpt2ft eval", overwrite=True,
                                               inputs={"--data": report / "summary.json"}), "--data")


def test_output_dir_removes_a_folder_it_made_when_the_body_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with output_dir(tmp_path / "new", "gpt2ft prepare"):
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(UserError):
        with output_dir(tmp_path / "old", "gpt2ft prepare"):
            raise UserError("bad data")
    assert (tmp_path / "old").is_dir()  # not made by this call: kept


# ----- bounded reads -------------------------------------------------------------------------------
def test_read_user_text_bom_limit_binary_and_encoding(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert read_user_text(tmp_path / "a.txt") == "hello"
    refused(tmp_path, lambda: read_user_text(tmp_path / "a.txt", "prompts file", limit=4), "a.txt",
            "8 bytes is over the limit of 4 bytes for a prompts file")
    (tmp_path / "b.txt").write_bytes(b"PK\x03\x04\x00\x00")
    refused(tmp_path, lambda: read_user_text(tmp_path / "b.txt", "conversation"), "binary")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9")
    refused(tmp_path, lambda: read_user_text(tmp_path / "c.txt"), "not UTF-8")
    refused(tmp_path, lambda: read_user_text(tmp_path), "is a folder")
    refused(tmp_path, lambda: read_user_text(tmp_path / "missing.txt"), "missing.txt", "cannot read")
    (tmp_path / "d.json").write_text('{"a": 1,\n oops}')
    refused(tmp_path, lambda: read_json(tmp_path / "d.json", "template", limit=100), "d.json:2", "template")


def test_a_data_file_over_the_limit_is_refused_before_it_is_parsed(tmp_path):
    from gpt2ft.data.instructions import load_records

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(MAX_DATA_FILE + 1)  # sparse: costs no disk, and is never read
    refused(tmp_path, lambda: load_records(big), "big.jsonl", "256.0 MB is over the limit of 256 MB for a data file",
            "hf:")
    assert check_size(tmp_path / "big.jsonl", "x", MAX_DATA_FILE + 1) == MAX_DATA_FILE + 1


def test_a_folder_or_binary_file_as_data_is_one_line(tmp_path):
    from gpt2ft.data.instructions import load_records
    from gpt2ft.data.text import read_lines

    (tmp_path / "d.jsonl").mkdir()
    refused(tmp_path, lambda: load_records(tmp_path / "d.jsonl"), "d.jsonl")
    refused(tmp_path, lambda: list(read_lines(tmp_path / "d.jsonl")), "d.jsonl", "cannot read")
    (tmp_path / "b.json").write_bytes(b'[{"instruction": "a\x00", "output": "b"}]')
    refused(tmp_path, lambda: load_records(tmp_path / "b.json"), "b.json:1", "binary")


def test_a_ctrl_c_inside_a_writers_cleanup_stays_a_ctrl_c(tmp_path):
    """torch.save's zip writer turns a KeyboardInterrupt raised mid-write into a RuntimeError while it closes;
    the second Ctrl-C of a training run must still end it as an interrupt (exit 130), leaving no temp file."""
    def interrupted_write(f):
        f.write(b"partial")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos 127744 vs 127632")

    target = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted_write)
    assert list(tmp_path.iterdir()) == []


def test_not_even_overwrite_writes_into_another_verbs_folder(tmp_path):
    out = claim_output_dir(tmp_path / "tok", "gpt2ft tokenizer train")
    (out / "vocab.json").write_text("{}")
    refused(tmp_path, lambda: claim_output_dir(out, "gpt2ft export", overwrite=True, files=("vocab.json",)),
            "made by `gpt2ft tokenizer train`", "another's")


@pytest.mark.parametrize("owned", [False, True])
def test_a_failed_verb_leaves_the_folder_as_it_found_it(tmp_path, owned):
    """No marker is left in a folder of the user's (a later run without --overwrite would take it as
    gpt2ft's), nor the folder it created; a folder already its own keeps its marker."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    if owned:
        (user / OUTPUT_MARKER).write_text(json.dumps({"made_by": "gpt2ft eval"}))
    before = files(tmp_path)
    for folder in (user, tmp_path / "new"):
        with pytest.raises(UserError):
            with output_dir(folder, "gpt2ft eval", overwrite=True, files=("summary.json",)):
                raise UserError("no examples")
    assert files(tmp_path) == before and not (tmp_path / "new").exists()


def test_what_an_earlier_run_of_the_verb_left_and_this_one_did_not_write_is_removed(tmp_path):
    names = ("vocab.json", "merges.txt", "word_vocab.json")
    with output_dir(tmp_path / "tok", "gpt2ft tokenizer train", files=names) as out:
        atomic_write(out / "word_vocab.json", lambda f: f.write(b"{}"))
    (out / "notes.txt").write_text("mine")  # not one of the verb's files: never touched
    with pytest.raises(UserError):  # a failed run removes nothing
        with output_dir(out, "gpt2ft tokenizer train", files=names):
            raise UserError("no text")
    assert (out / "word_vocab.json").exists()
    with output_dir(out, "gpt2ft tokenizer train", files=names):
        for name in names[:2]:
            atomic_write(out / name, lambda f: f.write(b"{}"))
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "merges.txt", "notes.txt", "vocab.json"]


def test_a_file_of_the_verbs_names_that_it_did_not_write_is_the_users(tmp_path):
    """The marker records what the verb wrote: a file of its names put there or edited since is the user's,
    so a rerun refuses without --overwrite (it deleted an added tokenizer.json and replaced an edited
    README.md), and with --overwrite replaces only what it writes again."""
    names = ("model.safetensors", "README.md", "tokenizer.json")
    verb = "gpt2ft export"

    def export(**kw):
        with output_dir(tmp_path / "exp", verb, files=names, **kw) as out:
            for name in names[:2]:
                atomic_write(out / name, lambda f: f.write(b"ours"))
        return out

    out = export()
    (out / "tokenizer.json").write_text("mine")
    with pytest.raises(UserError, match="tokenizer.json was put there since gpt2ft export wrote"):
        export()
    (out / "tokenizer.json").unlink()
    (out / "README.md").write_text("my notes")
    with pytest.raises(UserError, match="README.md was changed since"):
        export()
    assert (out / "README.md").read_text() == "my notes"
    (out / "tokenizer.json").write_text("mine")
    export(overwrite=True)  # replaces README.md (it writes it again), keeps the tokenizer.json it does not write
    assert (out / "README.md").read_text() == "ours" and (out / "tokenizer.json").read_text() == "mine"


def test_a_place_nothing_can_be_created_in_is_refused_before_any_work(tmp_path):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    for target in ("/proc/o.md", "/proc/sub/o.md"):
        refused(tmp_path, lambda: check_writable(target, what="--out-md"), "--out-md", "/proc", "cannot")
    refused(tmp_path, lambda: check_output_dir("/proc/report", "gpt2ft eval"), "/proc")
    refused(tmp_path, lambda: atomic_write(Path("/proc/o.md"), lambda f: f.write(b"x")), "/proc/o.md")
