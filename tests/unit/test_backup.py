"""Backup and restore of the state store, and the archives an operator may hand restore:
another cluster's, a corrupted one, a truncated one, a crafted one."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from appliance.backup import (
    BEFORE_RESTORE,
    BackupError,
    backup,
    daemon_users,
    read_archive,
    restore,
)
from appliance.store import DB_NAME, Lease, Store

DOMAIN = "demo.example.com"


def _state(tmp_path: Path, name: str = "state", macs: int = 3) -> Path:
    state = tmp_path / name
    with Store.open(state) as s:
        for i in range(macs):
            s.put_lease(
                Lease(f"02:00:00:00:00:{i:02x}", f"192.0.2.{10 + i}", None, 9e9, "bound", 1)
            )
        s.mark_installed("master-0", 123.0)
    return state


def _leases(state: Path) -> list[tuple[str, str]]:
    with Store.open(state) as s:
        return sorted((lease.mac, lease.ip) for lease in s.leases())


def _archive(tmp_path: Path) -> tuple[Path, Path]:
    state = _state(tmp_path)
    config = tmp_path / "inventory.yaml"
    config.write_text("cluster: {name: demo}\n")
    out = tmp_path / "b.tar.gz"
    backup(config, state, "demo", DOMAIN, out)
    return out, config


def test_round_trip_keeps_leases_and_install_marks(tmp_path: Path) -> None:
    out, config = _archive(tmp_path)
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # leases and the inventory: private
    manifest, _ = read_archive(out)
    assert manifest["domain"] == DOMAIN and manifest["schema_version"] >= 1
    assert "ignition files" in manifest["not_included"]
    fresh = tmp_path / "fresh"
    done = restore(out, config, fresh, DOMAIN)
    assert done.kept is None and done.inventory is None
    assert _leases(fresh) == _leases(tmp_path / "state")
    with Store.open(fresh) as s:
        assert s.is_installed("master-0")


def test_restore_keeps_the_current_store_with_what_only_its_wal_holds(tmp_path: Path) -> None:
    out, config = _archive(tmp_path)
    target = tmp_path / "target"
    # A store whose last commit is only in its WAL: what a daemon killed -9 leaves.
    writer = (
        "import os, sys; from appliance.store import Store, Lease\n"
        "s = Store.open(sys.argv[1]); s._conn.execute('PRAGMA wal_autocheckpoint=0')\n"
        "s.put_lease(Lease('02:aa:00:00:00:02', '192.0.2.98', None, 9e9, 'bound', 1))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(target)], check=True, timeout=30)
    assert (target / f"{DB_NAME}-wal").stat().st_size > 0
    with pytest.raises(BackupError, match="running"):
        restore(out, config, target, DOMAIN, running=True)
    done = restore(out, config, target, DOMAIN)
    assert done.kept == target / BEFORE_RESTORE
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / DB_NAME).write_bytes(done.kept.read_bytes())
    assert ("02:aa:00:00:00:02", "192.0.2.98") in _leases(kept)
    assert _leases(target) == _leases(tmp_path / "state")


def test_another_clusters_backup_is_refused_unless_forced(tmp_path: Path) -> None:
    out, config = _archive(tmp_path)
    target = _state(tmp_path, "other", macs=1)
    before = (target / DB_NAME).read_bytes()
    with pytest.raises(BackupError, match=r"not of 'other\.example\.com'.*--force"):
        restore(out, config, target, "other.example.com")
    assert (target / DB_NAME).read_bytes() == before  # nothing touched
    restore(out, config, target, "other.example.com", force=True)
    assert len(_leases(target)) == 3


def test_the_inventory_is_restored_only_when_asked(tmp_path: Path) -> None:
    out, config = _archive(tmp_path)
    config.write_text("cluster: {name: demo}  # edited since\n")
    restore(out, config, tmp_path / "a", DOMAIN)
    assert "edited" in config.read_text()
    done = restore(out, config, tmp_path / "b", DOMAIN, with_inventory=True)
    assert done.inventory == config and config.read_text() == "cluster: {name: demo}\n"
    assert "edited" in config.with_name("inventory.yaml.before-restore").read_text()


def _read(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None, member  # a regular file, not a directory or link
    return f.read()


def _rewrite(src: Path, dest: Path, change: dict[str, bytes | None]) -> None:
    """A copy of the archive with members replaced (None: left out) or added."""
    with tarfile.open(src) as tar:
        members: dict[str, bytes | None] = {i.name: _read(tar, i) for i in tar}
    members.update(change)
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in members.items():
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("db_byte", "appliance.db is corrupted"),
        ("inventory", "inventory.yaml is corrupted"),
        ("no_db", "appliance.db missing"),
        ("traversal", "unexpected member '../appliance.db'"),
        ("manifest", "manifest.json is damaged"),
        ("truncated", "not a readable backup archive"),
        ("not_gzip", "not a readable backup archive"),
        ("empty", "not a readable backup archive|no manifest"),
    ],
)
def test_a_damaged_archive_is_refused_and_nothing_is_touched(
    tmp_path: Path, damage: str, why: str
) -> None:
    out, config = _archive(tmp_path)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(out) as tar:
        db = _read(tar, DB_NAME)
    if damage == "db_byte":
        _rewrite(out, bad, {DB_NAME: _flip(db, len(db) // 2)})
    elif damage == "inventory":
        _rewrite(out, bad, {"inventory.yaml": b"cluster: {name: evil}\n"})
    elif damage == "no_db":
        _rewrite(out, bad, {DB_NAME: None})
    elif damage == "traversal":
        _rewrite(out, bad, {"../appliance.db": db})
    elif damage == "manifest":
        _rewrite(out, bad, {"manifest.json": b"{not json"})
    elif damage == "truncated":
        bad.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    elif damage == "not_gzip":
        bad.write_bytes(b"PK\x03\x04 a zip, not ours" * 10)
    elif damage == "empty":
        bad.write_bytes(gzip.compress(b""))
    target = _state(tmp_path, "target", macs=1)
    before = (target / DB_NAME).read_bytes()
    with pytest.raises(BackupError, match=why):
        restore(bad, config, target, DOMAIN)
    assert (target / DB_NAME).read_bytes() == before
    assert sorted(p.name for p in target.iterdir() if "restore" in p.name) == []


def test_a_database_that_matches_its_manifest_but_is_not_sqlite_is_refused(
    tmp_path: Path,
) -> None:
    """A hand-made archive whose sums are right: the database itself is still checked."""
    out, config = _archive(tmp_path)
    junk = b"this is not a database" * 200
    manifest, _ = read_archive(out)
    manifest["members"][DB_NAME]["sha256"] = __import__("hashlib").sha256(junk).hexdigest()
    bad = tmp_path / "bad.tar.gz"
    _rewrite(out, bad, {DB_NAME: junk, "manifest.json": json.dumps(manifest).encode()})
    target = tmp_path / "target"
    with pytest.raises(BackupError, match="not a usable database"):
        restore(bad, config, target, DOMAIN)
    assert not (target / DB_NAME).exists()


def test_a_process_with_the_store_open_is_found(tmp_path: Path) -> None:
    state = _state(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('select 1');"
            "print('open', flush=True); sys.stdin.readline()",
            str(state / DB_NAME),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert daemon_users(state) == [holder.pid]
        out = tmp_path / "b.tar.gz"
        config = tmp_path / "inventory.yaml"
        config.write_text("x: 1\n")
        backup(config, state, "demo", DOMAIN, out)  # a backup is fine while it is open
        with pytest.raises(BackupError, match=f"running on .*PID {holder.pid}"):
            restore(out, config, state, DOMAIN)
    finally:
        holder.kill()  # by PID
        holder.wait(timeout=10)
    assert daemon_users(state) == []


def test_backup_without_a_store_says_so(tmp_path: Path) -> None:
    config = tmp_path / "inventory.yaml"
    config.write_text("x: 1\n")
    with pytest.raises(BackupError, match="no state store"):
        backup(config, tmp_path / "none", "demo", DOMAIN, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_a_second_restore_keeps_the_first_kept_store(tmp_path: Path) -> None:
    out, config = _archive(tmp_path)
    target = _state(tmp_path, "target", macs=1)
    original = _leases(target)
    restore(out, config, target, DOMAIN)
    restore(out, config, target, DOMAIN)
    kept = sorted(p for p in target.iterdir() if p.name.startswith(BEFORE_RESTORE))
    assert [p.name == BEFORE_RESTORE for p in kept].count(True) == 1 and len(kept) == 2
    older = tmp_path / "older"
    older.mkdir()
    dated = next(p for p in kept if p.name != BEFORE_RESTORE)
    (older / DB_NAME).write_bytes(dated.read_bytes())
    assert _leases(older) == original


@pytest.mark.root
def test_the_restored_store_keeps_the_daemons_owner_and_mode(tmp_path: Path) -> None:
    """restore runs as root; the daemon runs as its own user and must still open the file."""
    import os

    out, config = _archive(tmp_path)
    target = _state(tmp_path, "target", macs=1)
    os.chown(target, 65534, 65534)
    os.chown(target / DB_NAME, 65534, 65534)
    os.chmod(target / DB_NAME, 0o640)
    restore(out, config, target, DOMAIN)
    st = (target / DB_NAME).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.chown(fresh, 65534, 65534)
    restore(out, config, fresh, DOMAIN)
    assert (fresh / DB_NAME).stat().st_uid == 65534
