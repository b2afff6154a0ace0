"""`appliance backup` and `appliance restore`: the state store and the inventory in one file.

The archive is a tar.gz of three members: `appliance.db` (a consistent copy of the state
store taken with SQLite's online backup API, so it can be taken while the daemon writes:
the copy is one read transaction on the WAL database and never blocks the writer),
`inventory.yaml` (the inventory file as it is on disk) and `manifest.json` (cluster,
domain, appliance and schema version, time, and the sha256 of the other members).
Ignition files, boot images and the admin token are NOT in it: they are re-made or
re-copied from their sources.

Restore refuses while a daemon uses the state directory, refuses another cluster's
backup unless forced, verifies every checksum and the database before touching
anything, and keeps the current store as `appliance.db.before-restore`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.store import DB_NAME, SCHEMA_VERSION

FORMAT = 1
MANIFEST = "manifest.json"
INVENTORY = "inventory.yaml"
MEMBERS = (DB_NAME, INVENTORY)
BEFORE_RESTORE = f"{DB_NAME}.before-restore"
NOT_INCLUDED = ("ignition files", "boot images", "admin token", "kubeconfig")
MAX_MEMBER = 1 << 30  # a bigger member is not one of ours: refuse before reading it
BUSY_TIMEOUT_S = 30.0  # the backup waits this long for a lock an operator's shell holds


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why, for the operator."""


@dataclass(frozen=True)
class Restored:
    manifest: dict[str, Any]
    kept: Path | None  # the previous store, when there was one
    inventory: Path | None  # the inventory written, with --inventory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy_db(src_path: Path, dest_path: Path) -> int:
    """A consistent copy of the SQLite file at `src_path` (WAL content included) as a
    self-contained rollback-journal file; returns its schema version."""
    try:
        # Read-write open (it writes nothing): a read-only one fails on a WAL file whose
        # -shm is missing, as after a clean stop.
        src = sqlite3.connect(src_path, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open state store {src_path}: {exc}") from exc
    try:
        dest = sqlite3.connect(dest_path)
        try:
            # pages=-1: one step, i.e. one read transaction: a snapshot of one instant.
            src.backup(dest, pages=-1)
            dest.execute("PRAGMA journal_mode=DELETE")
            return int(dest.execute("PRAGMA user_version").fetchone()[0])
        finally:
            dest.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy state store {src_path}: {exc}") from exc
    finally:
        src.close()


def backup(config: Path, state_dir: Path, cluster: str, domain: str, out: Path) -> dict[str, Any]:
    """Write the archive `out` (atomically, mode 0600); return its manifest."""
    db = state_dir / DB_NAME
    if not db.is_file():
        raise BackupError(f"no state store at {db}: nothing to back up")
    inventory = config.read_bytes()
    out = out.absolute()
    with tempfile.TemporaryDirectory(prefix="appliance-backup-") as tmp:
        copy = Path(tmp) / DB_NAME
        schema = _copy_db(db, copy)
        data = copy.read_bytes()
    now = time.time()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "cluster": cluster,
        "domain": domain,
        "appliance_version": __version__,
        "schema_version": schema,
        "created": now,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "inventory_path": str(config.absolute()),
        "members": {
            DB_NAME: {"sha256": _sha256(data), "size": len(data)},
            INVENTORY: {"sha256": _sha256(inventory), "size": len(inventory)},
        },
        "not_included": list(NOT_INCLUDED),
    }
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            # The manifest first: `tar tzvf` and a restore see what it is before the rest.
            for name, content in ((MANIFEST, blob), (DB_NAME, data), (INVENTORY, inventory)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(content), int(now), 0o600
                tar.addfile(info, io.BytesIO(content))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, out)  # never a half-written archive under the real name
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return manifest


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the verified members of a backup; BackupError when anything is off."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for info in tar:
                if not info.isfile() or info.name not in (MANIFEST, *MEMBERS):
                    raise BackupError(f"{path}: unexpected member {info.name!r}: not a backup")
                if info.name in members:
                    raise BackupError(f"{path}: member {info.name!r} twice: not a backup")
                if info.size > MAX_MEMBER:
                    raise BackupError(f"{path}: member {info.name!r} too large")
                f = tar.extractfile(info)
                assert f is not None  # a regular file
                members[info.name] = f.read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise BackupError(f"{path}: not a readable backup archive ({exc})") from exc
    if MANIFEST not in members:
        raise BackupError(f"{path}: no {MANIFEST}: not a backup")
    try:
        manifest = json.loads(members.pop(MANIFEST))
        expected = manifest["members"]
        if not isinstance(manifest, dict) or not isinstance(expected, dict):
            raise TypeError("not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{path}: {MANIFEST} is damaged ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: backup format {manifest.get('format')!r} is not {FORMAT}")
    for name in MEMBERS:
        want = (
            expected.get(name, {}).get("sha256") if isinstance(expected.get(name), dict) else None
        )
        if name not in members or want is None:
            raise BackupError(f"{path}: {name} missing")
        if _sha256(members[name]) != want:
            raise BackupError(f"{path}: {name} is corrupted (sha256 differs from the manifest)")
    return manifest, members


def daemon_users(state_dir: Path) -> list[int]:
    """PIDs of processes that have the store (or its WAL) open: a daemon running on it."""
    names = {str((state_dir / n).resolve()) for n in (DB_NAME, f"{DB_NAME}-wal")}
    me = os.getpid()
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if os.readlink(fd) in names:
                    pids.append(int(proc.name))
                    break
            except OSError:
                continue
    return pids


def _check_db(path: Path) -> int:
    """The schema version of a restored database file, after an integrity check."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"the backup's state store is not a usable database ({exc})") from exc
    if ok != "ok":
        raise BackupError(f"the backup's state store fails its integrity check ({ok})")
    if version > SCHEMA_VERSION:
        raise BackupError(
            f"the backup's state store has schema version {version}, newer than this "
            f"appliance supports ({SCHEMA_VERSION}): restore it with a newer appliance"
        )
    return version


def restore(
    archive: Path,
    config: Path,
    state_dir: Path,
    domain: str,
    *,
    force: bool = False,
    with_inventory: bool = False,
    running: bool = False,
) -> Restored:
    """Put the backup `archive` back into `state_dir` (and the inventory to `config`).

    `running`: the caller found the admin endpoint of this inventory answering.
    Everything is checked before the first file is touched.
    """
    manifest, members = read_archive(archive)
    theirs = manifest.get("domain")
    if theirs != domain and not force:
        raise BackupError(
            f"{archive} is a backup of cluster {theirs!r}, not of {domain!r} "
            f"({config}); --force restores it anyway"
        )
    pids = daemon_users(state_dir)
    if running or pids:
        who = f" (PID {', '.join(map(str, pids))})" if pids else " (its admin endpoint answers)"
        raise BackupError(f"an appliance is running on {state_dir}{who}: stop it before restoring")
    state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    db = state_dir / DB_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DB_NAME}.restore.", dir=state_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(members[DB_NAME])
            f.flush()
            os.fsync(f.fileno())
        _check_db(tmp)
        # The daemon (often its own system user) must be able to open what we put there:
        # the new file gets the owner and mode of the store it replaces, else of the dir.
        ref = os.stat(db if db.exists() else state_dir)
        os.chmod(tmp, (ref.st_mode & 0o660) if db.exists() else 0o640)
        if os.geteuid() == 0:
            os.chown(tmp, ref.st_uid, ref.st_gid)
        kept: Path | None = None
        if db.exists():
            kept = state_dir / BEFORE_RESTORE
            if kept.exists():
                # A second restore must not replace the store kept by the first (that
                # one may be the only copy of the real state): it moves aside, dated.
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(kept.stat().st_mtime))
                aside = kept.with_name(f"{BEFORE_RESTORE}.{stamp}")
                n = 1
                while aside.exists():
                    aside, n = kept.with_name(f"{BEFORE_RESTORE}.{stamp}.{n}"), n + 1
                os.replace(kept, aside)
            _copy_db(db, kept)  # through SQLite: what is only in the WAL is kept too
            os.chmod(kept, 0o600)
        for stale in (f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            # a WAL left beside the new file would be replayed into it
            (state_dir / stale).unlink(missing_ok=True)
        os.replace(tmp, db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written: Path | None = None
    if with_inventory:
        old = config.with_name(config.name + ".before-restore")
        if config.exists():
            old.write_bytes(config.read_bytes())
        part = config.with_name(f".{config.name}.restore")
        part.write_bytes(members[INVENTORY])
        os.replace(part, config)
        written = config
    return Restored(manifest, kept, written)


def _plan(config: str) -> Any:
    from appliance.inventory import load_inventory
    from appliance.plan import build_plan

    return build_plan(load_inventory(Path(config)))


def cmd_backup(args: Any) -> int:
    """`appliance backup OUT`."""
    import sys

    plan = _plan(args.config)
    try:
        manifest = backup(plan.source, plan.state_dir, plan.cluster, plan.domain, Path(args.out))
    except (BackupError, OSError) as exc:
        print(f"appliance: backup failed: {exc}", file=sys.stderr)
        return 1
    db = manifest["members"][DB_NAME]
    print(
        f"{args.out}: cluster {manifest['domain']}, state store schema "
        f"{manifest['schema_version']} ({db['size']} bytes) and the inventory; "
        f"not included: {', '.join(NOT_INCLUDED)}"
    )
    return 0


def _admin_answers(config: str, admin: str | None, token_file: str | None) -> bool:
    from appliance import client

    target = client.target_for(Path(config), admin, token_file)
    if target.base is None:
        return False
    try:
        client.call(target, "GET", "/api/v1/status")
    except client.NotRunning:
        return False
    except client.ClientError:
        return True  # something answers there (even a refusal): do not pull its store away
    return True


def cmd_restore(args: Any) -> int:
    """`appliance restore IN`."""
    import sys

    plan = _plan(args.config)
    try:
        done = restore(
            Path(args.archive),
            plan.source,
            plan.state_dir,
            plan.domain,
            force=args.force,
            with_inventory=args.inventory,
            running=_admin_answers(args.config, args.admin, args.token_file),
        )
    except (BackupError, OSError) as exc:
        print(f"appliance: restore refused: {exc}", file=sys.stderr)
        return 1
    m = done.manifest
    print(f"restored the state store of {m.get('domain')} from {m.get('created_utc')}")
    if done.kept is not None:
        print(f"the previous state store is kept as {done.kept}")
    if done.inventory is not None:
        print(f"the inventory {done.inventory} is the backup's (the old one: .before-restore)")
    else:
        print("the inventory was left as it is (--inventory restores it too)")
    return 0
