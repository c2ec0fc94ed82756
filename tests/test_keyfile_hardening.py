"""Issue 16 item 9: the key file check looks at more than the mode - the owner, the directory
(no write bits for group/others) and symbolic links (refused unless allowed). Each refusal is a
one-line KeyFileError naming the rule; through the CLI, exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pqe2ee.cli import cli
from pqe2ee.server.keyfile import (
    KeyFileError,
    load_or_create_key,
    load_or_create_xwing_key,
    read_seed,
)

ROOT = os.geteuid() == 0
PQE2EE_BIN = Path(sys.executable).with_name("pqe2ee")


def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    return d


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = private_dir(tmp_path)
    path = d / "k"
    load_or_create_key(path)
    d.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    msg = str(info.value)
    assert "writable by group or others" in msg and "chmod go-w" in msg and "\n" not in msg
    # and no key is ever created in such a directory
    with pytest.raises(KeyFileError, match="writable by group or others"):
        load_or_create_key(d / "new")
    assert not (d / "new").exists()


def test_readable_directory_is_fine(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    d.chmod(0o755)  # /etc/pqe2ee-style: others may list, the file itself is 0600
    _, created = load_or_create_key(d / "k")
    assert created
    assert not load_or_create_key(d / "k")[1]


def test_symlink_refused_by_default_for_both_key_kinds(tmp_path: Path) -> None:
    from pqe2ee.backends.xwing import get_xwing

    d = private_dir(tmp_path)
    load_or_create_key(d / "real")
    (d / "link").symlink_to(d / "real")
    with pytest.raises(KeyFileError, match="symbolic link"):
        read_seed(d / "link")
    load_or_create_xwing_key(d / "real2", get_xwing())
    (d / "link2").symlink_to(d / "real2")
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_xwing_key(d / "link2", get_xwing())
    assert not load_or_create_xwing_key(d / "link2", get_xwing(), allow_symlink=True)[1]


def test_allowed_symlink_target_directory_is_checked(tmp_path: Path) -> None:
    target_dir = tmp_path / "shared"
    target_dir.mkdir(mode=0o700)
    load_or_create_key(target_dir / "real")
    target_dir.chmod(0o777)
    d = private_dir(tmp_path)
    (d / "link").symlink_to(target_dir / "real")
    with pytest.raises(KeyFileError, match="writable by group or others"):
        load_or_create_key(d / "link", allow_symlink=True)


@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    path = d / "k"
    load_or_create_key(path)
    os.chown(path, 4321, 4321)
    with pytest.raises(KeyFileError, match="owned by uid 4321, not by this user"):
        load_or_create_key(path)


@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
def test_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    load_or_create_key(d / "k")
    os.chown(d, 4321, 4321)
    with pytest.raises(KeyFileError, match="owned by uid 4321, neither this user nor root"):
        load_or_create_key(d / "k")


def test_cli_symlink_flag(tmp_path: Path) -> None:
    d = private_dir(tmp_path)
    load_or_create_key(d / "real")
    (d / "link").symlink_to(d / "real")
    args = ["instance", "--upstream", "http://127.0.0.1:9", "--key-file", str(d / "link")]
    # the real binary, bounded: before the fix it followed the link and served
    proc = subprocess.run([str(PQE2EE_BIN), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "is a symbolic link; refusing it (--allow-key-symlink follows it)" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_text = CliRunner().invoke(cli, ["instance", "--help"]).output
    assert "--allow-key-symlink" in help_text
