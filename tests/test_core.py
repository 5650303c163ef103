"""core: names, whole-or-nothing writes and the header reader, all without torch."""

from __future__ import annotations

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
