"""Checks that a failed load writes nothing, anywhere.

`fails_without_writing(path, load, error, match, monkeypatch, tmp_path)`
runs `load(path)` with the working directory and the temporary directory
moved to fresh empty folders, expects `error` matching `match`, and checks
that the load left the folder holding `path`, the working directory and the
temporary directory as they were. Returns the error.
"""

import os
import tempfile

import pytest


def file_tree(path):
    """Every file and folder under `path`, with its size and mtime."""
    entries = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            stat = os.stat(full)
            entries[os.path.relpath(full, path)] = (stat.st_size, stat.st_mtime_ns)
    return entries


def fails_without_writing(path, load, error, match, monkeypatch, tmp_path):
    workdir, tempdir = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    tempdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TMPDIR", str(tempdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tempdir))
    parent = os.path.dirname(path)
    before = file_tree(parent)
    with pytest.raises(error, match=match) as info:
        load(path)
    assert file_tree(parent) == before, "the failed load changed the folder"
    assert os.listdir(workdir) == [], "the failed load wrote to the cwd"
    assert os.listdir(tempdir) == [], "the failed load wrote temp files"
    return info.value
