"""core: names, whole-or-nothing writes and the header reader, all without torch."""

from __future__ import annotations

import re

import pytest

from core.files import read_safetensors_header, staged_folder, write_bytes_atomic
from core.names import check_style_name, safe_style_name, with_trigger


@pytest.mark.parametrize("name", ["ink", "ink-2", "A_b", "9lives", "x" * 64])
def test_safe_style_names_pass(name):
    assert check_style_name(name) == name


@pytest.mark.parametrize("name", ["", "../evil", ".hidden", "-dash", "a b", "a/b", "x" * 65, None, 3])
def test_unsafe_style_names_are_refused_with_the_rule(name):
    with pytest.raises(ValueError, match="use 1-64 letters, digits"):
        check_style_name(name)


def test_safe_style_name_makes_any_text_valid():
    for text in ("My Pixel Art (v2)", "../../etc/passwd", "", "ünïcode", "-" * 80):
        assert check_style_name(safe_style_name(text))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "style.bin"
    write_bytes_atomic(path, b"old")

    def full_disk(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr("core.files.os.fsync", full_disk)  # the bytes are written, flushing them fails
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["style.bin"]


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "jobs" / "0001"
    target.parent.mkdir()
    with pytest.raises(RuntimeError):
        with staged_folder(target) as folder:
            (folder / "a.png").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert list(target.parent.iterdir()) == []
    with staged_folder(target) as folder:
        (folder / "a.png").write_bytes(b"whole")
    assert (target / "a.png").read_bytes() == b"whole"
    with pytest.raises(FileExistsError):  # someone else made it first: theirs stays
        with staged_folder(target) as folder:
            (folder / "a.png").write_bytes(b"other")
    assert (target / "a.png").read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["0001"]


@pytest.mark.parametrize("data", [b"abc", (2**40).to_bytes(8, "little") + b"{}", (5).to_bytes(8, "little") + b"hello",
                                  (2).to_bytes(8, "little") + b"[]"])
def test_the_header_reader_refuses_what_is_not_safetensors(tmp_path, data):
    (tmp_path / "x.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors_header(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "text, trigger, expected",
    [
        ("a red star", "ink", "a red star, ink"),
        ("ink, a red star", "ink", "ink, a red star"),  # there already: not twice
        ("A red star in INK", "ink", "A red star in INK"),  # whole words, any case
        ("a red stink", "ink", "a red stink, ink"),  # part of a word does not count
        ("a red star,", "ink", "a red star, ink"),
        ("a red star", "", "a red star"),
        ("", "ink", "ink"),
        ("a red star", "my  style", "a red star, my style"),
    ],
)
def test_the_trigger_word_is_added_once(text, trigger, expected):
    assert with_trigger(text, trigger) == expected


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_written_files_have_the_usual_mode_under_the_umask(tmp_path, umask, mode):
    """Issue 17: mkstemp's 0600 kept ComfyUI or A1111 running as another user from reading an export."""
    import os

    old = os.umask(umask)
    try:
        path = write_bytes_atomic(tmp_path / "style.safetensors", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def _safetensors(tensor_bytes: int = 8) -> bytes:
    """A one-tensor safetensors file, built by hand (no torch): its header, then its data."""
    import json

    header = json.dumps({"a": {"dtype": "F32", "shape": [tensor_bytes // 4], "data_offsets": [0, tensor_bytes]},
                         "__metadata__": {"format": "pt"}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(tensor_bytes)


@pytest.mark.parametrize("cut, words", [(-4, "damaged (truncated"), (-8, "damaged (truncated"),
                                        (3, "damaged (longer than its header says")])
def test_the_header_reader_refuses_a_file_whose_size_its_header_does_not_describe(tmp_path, cut, words):
    """Issue 18, item 12: a style cut short after an intact header was listed as a good one."""
    data = _safetensors()
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    assert read_safetensors_header(path)[0] == {"format": "pt"}
    path.write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    with pytest.raises(ValueError, match=re.escape(words)):
        read_safetensors_header(path)


def test_a_long_hostile_name_is_echoed_as_a_short_prefix():
    """Issue 18, item 15: messages name what was sent by its first 40 characters, not megabytes of it."""
    with pytest.raises(ValueError) as caught:
        check_style_name("<script>" + "x" * 100_000)
    assert "'<script>xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'… is not allowed" in str(caught.value)
    assert len(str(caught.value)) < 200
