"""Output folders: each belongs to one run of one dataset, and ``overwrite`` deletes only what that run wrote.

Every writer that owns a folder (generated images, a trained classifier,
hardness checkpoint, diffusion model, LoRA adapters, an export) calls
:func:`claim_output_folder` before any work. The folder's ``OWNER_FILE``
names the dataset (id and name) and run key that own it; a folder owned by
another run or dataset, or holding files fairbalance did not write, is
refused, ``overwrite`` included. The entries (files or subfolders) a run
writes are appended to ``LIST_FILE`` (:func:`record`, :func:`recording`),
so ``overwrite`` deletes exactly those: never a user's file, never the
folder itself. A folder that holds the outputs of one setting (a generator's
images, a diffusion model, LoRA adapters) is then checked with
:func:`claim_setting`: another setting's outputs are refused unless
``overwrite``, which deletes them. Dataset builders' split folders follow
:func:`prepare_split_folders`. Default folders are built from names with
:func:`default_folder`, which sanitises them and keeps the path under its root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Callable

from fairbalance.core import claims, validation

OWNER_FILE = ".fairbalance_owner.json"
LIST_FILE = ".fairbalance_files"


def safe_name(name: str) -> str:
    """``name`` as one path component: letters, digits, ``._-`` only, never ``.``/``..``; a changed name gets a hash."""
    name = str(name)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "_"
    if safe != name:  # "a/b" and "a_b" must not share a folder
        safe = f"{safe[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def under(root: str, *parts: str) -> str:
    """``root/part/...`` after checking the resolved path stays under ``root`` (no ``..``, no symlink out)."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise validation.FairBalanceError(f"{os.path.join(*parts)!r} leads outside {root}")
    return path


def default_folder(kind: str, *names: str) -> str:
    """``$FAIRBALANCE_DATA_DIR/<kind>/<name>/...``, each name sanitised (dataset names may hold ``../``)."""
    from fairbalance.core import config

    return under(config.data_dir(), kind, *(safe_name(n) for n in names))


def _owner_of(dataset, run_key: str) -> dict:
    return {"dataset_id": str(dataset._doc.id), "dataset": dataset.name, "run_key": run_key}


def read_owner(folder: str) -> dict | None:
    path = os.path.join(folder, OWNER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise validation.FairBalanceError(f"{path} is unreadable ({e}); choose another output folder") from e


def _dataset_exists(dataset_id: str) -> bool:
    import fiftyone.core.odm as foo
    from bson import ObjectId

    try:
        return foo.get_db_conn().datasets.find_one({"_id": ObjectId(dataset_id)}, {"_id": 1}) is not None
    except Exception:  # a malformed id: not one of ours, so not an orphan either
        return True


def _own_entries(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if not n.startswith((OWNER_FILE, LIST_FILE))]


def listed(folder: str) -> list[str]:
    """The entries the owning run recorded in ``folder`` (relative names), in order, once each."""
    path = os.path.join(folder, LIST_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(dict.fromkeys(line.rstrip("\n") for line in f if line.strip()))


def record(folder: str, names) -> None:
    """Append entries of ``folder`` (relative names or paths inside it) to its list, before they are written.

    Appends are single small writes, so shards of one job may record at once.
    Nothing is recorded in a folder no run owns.
    """
    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, OWNER_FILE)):
        return
    rel = [os.path.relpath(os.path.abspath(os.path.join(folder, n)), folder) for n in names]
    rel = [r for r in rel if r != "." and not r.startswith("..")]
    if rel:
        with open(os.path.join(folder, LIST_FILE), "a") as f:
            f.write("".join(r + "\n" for r in rel))


@contextlib.contextmanager
def recording(folder: str):
    """Record every top-level entry that appears in ``folder`` while the block runs (even if it raises)."""
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    try:
        yield folder
    finally:
        if os.path.isdir(folder):
            record(folder, sorted(set(_own_entries(folder)) - before))


def remove_listed(folder: str) -> int:
    """Delete the entries the owning run recorded in ``folder`` (never anything else); returns how many."""
    removed = 0
    for name in listed(folder):
        path = os.path.join(folder, name)
        if os.path.commonpath([os.path.realpath(folder), os.path.realpath(path)]) != os.path.realpath(folder):
            continue  # a planted "../" line
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        elif os.path.lexists(path):
            os.remove(path)
            removed += 1
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, LIST_FILE))
    return removed


def _write_owner(folder: str, owner: dict) -> None:
    tmp = os.path.join(folder, f"{OWNER_FILE}.{uuid.uuid4().hex}.tmp")  # shards claiming at once: each renames its own
    with open(tmp, "w") as f:
        json.dump(owner, f, indent=1)
    os.replace(tmp, os.path.join(folder, OWNER_FILE))


def claim_output_folder(folder: str, dataset, run_key: str, overwrite: bool = False,
                        shared_by: str | None = None, adopt_recorded: bool = True, reuse: bool = True) -> str:
    """Make ``folder`` this run's (``dataset`` + ``run_key``), before any work; returns its absolute path.

    A new or empty folder becomes this run's. A folder this run owns is
    reused (``overwrite=True`` first deletes the entries it recorded); one
    owned by a dataset that no longer exists is taken over (its recorded
    entries deleted). Anything else is refused, ``overwrite`` included: a
    folder of another run or dataset, or a non-empty folder fairbalance
    did not write (unless ``adopt_recorded`` and this run's record names
    it: a folder made before owner files existed). ``reuse=False`` (an
    export): a folder holding this run's outputs is refused unless
    ``overwrite`` too. The folder is also claimed against concurrent
    writers (:func:`claims.claim_folder`).
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise validation.FairBalanceError(f"Output folder {folder} is a file, not a folder; choose another output_dir")
    claims.claim_folder(folder, shared_by)  # first: a folder another operation holds is not even created
    validation.require_writable_dir(folder)
    me = _owner_of(dataset, run_key)
    owner = read_owner(folder)
    if owner is None:
        entries = _own_entries(folder)
        if entries and not (adopt_recorded and _recorded_by_run(dataset, run_key, folder)):
            shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
            raise validation.FairBalanceError(
                f"Output folder {folder} holds files fairbalance did not write ({len(entries)}: {shown}); "
                "nothing there is replaced, overwrite or not: choose an empty or new folder")
        _write_owner(folder, me)
        return folder
    same = owner.get("dataset_id") == me["dataset_id"] and owner.get("run_key") == run_key
    if not same and owner.get("dataset_id") != me["dataset_id"] and not _dataset_exists(owner.get("dataset_id", "")):
        remove_listed(folder)  # the files of a deleted dataset's run
        _write_owner(folder, me)
        return folder
    if not same:
        raise validation.FairBalanceError(
            f"Output folder {folder} belongs to run '{owner.get('run_key')}' of dataset '{owner.get('dataset')}'; "
            "a folder holds one run's files only, overwrite or not: choose another output folder")
    if not (reuse or overwrite) and listed(folder):
        raise validation.FairBalanceError(f"{folder} is not empty; pass overwrite=True to replace it")
    if owner != me:  # the dataset was renamed
        _write_owner(folder, me)
    if overwrite:
        remove_listed(folder)
    return folder


def claim_setting(folder: str, previous, setting, overwrite: bool, unknown: int = 0, kind: str = "outputs",
                  forget: Callable[[], None] | None = None) -> bool:
    """The one rule for what a claimed folder holds: the outputs of one setting (configuration).

    Called right after :func:`claim_output_folder` by the writers whose folder holds the outputs of one setting
    (generated images, a diffusion model, LoRA adapters), each of which reads its own manifest: ``previous`` is
    the setting it records (None: no manifest), ``unknown`` how many outputs lie there without one. Nothing
    there, or ``previous == setting``: False (kept; a rerun or another shard of the job carries on). Another
    setting, or outputs of an unknown run: refused unless ``overwrite``, which calls ``forget`` (e.g. delete the
    samples of those files) and deletes what the owning run listed in the folder (never other files): True.
    """
    if (previous is None and not unknown) or previous == setting:
        return False
    if not overwrite:
        what = f"{kind} of another configuration" if previous is not None else f"{unknown} {kind} of an unknown run"
        raise validation.FairBalanceError(
            f"{folder} already holds {what}; pass overwrite=True to replace them or choose another output_dir")
    if forget is not None:
        forget()
    remove_listed(folder)
    return True


def prepare_split_folders(output_dir: str, name: str, maker: str, splits=("train", "test")) -> None:
    """Empty split folders under ``output_dir``, marked as ``maker``'s (the marker file ``.<maker>``, holding the
    dataset ``name``); split folders that ``maker`` did not write are refused. The rule of every dataset builder
    (Colored Digits, Colored MNIST, Corrupted MNIST). Called inside the builder's :func:`claims.exclusive`
    scope, it first claims the dataset name and the folder against concurrent operations (a rebuild with
    ``overwrite=True`` is refused while another operation writes that dataset or folder); a folder holding
    the images of another dataset that still exists is refused too."""
    claims.claim_dataset_name(name)
    claims.claim_folder(output_dir)
    marker = os.path.join(output_dir, f".{maker}")
    if any(os.path.exists(os.path.join(output_dir, s)) for s in splits) and not os.path.isfile(marker):
        raise validation.FairBalanceError(
            f"{output_dir} already holds {', '.join(s + '/' for s in splits[:-1])} or {splits[-1]}/ folders not "
            f"written by {maker}; choose another output_dir"
        )
    owner = open(marker).read().strip() if os.path.isfile(marker) else None
    if owner and owner != name:
        import fiftyone as fo

        if fo.dataset_exists(owner):
            raise validation.FairBalanceError(
                f"{output_dir} holds the images of dataset '{owner}'; building '{name}' there would delete them: "
                f"choose another output_dir (or delete '{owner}' first)")
    validation.require_writable_dir(output_dir)
    with open(marker, "w") as f:
        f.write(name + "\n")
    for split in splits:
        shutil.rmtree(os.path.join(output_dir, split), ignore_errors=True)
        os.makedirs(os.path.join(output_dir, split))


def _recorded_by_run(dataset, run_key: str, folder: str) -> bool:
    """Whether ``run_key``'s record on ``dataset`` names ``folder`` (a folder written before owner files)."""
    from fairbalance.core import runs

    if not dataset.has_run(run_key):
        return False
    values = runs.get_run_config(dataset, run_key).values()
    return any(isinstance(v, str) and os.path.abspath(v) == folder for v in values)


def replace_contents(folder: str, write) -> None:
    """Delete what the run recorded in ``folder``, then ``write(folder)``, recording what it writes.

    For writers that replace their output only once the new one is ready
    (a classifier saved after training), not when the folder is claimed.
    """
    remove_listed(folder)
    with recording(folder):
        write(folder)


PIPELINE_DIRS_ENV = "FAIRBALANCE_PIPELINE_DIRS"


def pipeline_file(path: str) -> str:
    """The pipeline file the App's ``run_pipeline`` operator may read: a ``.yml``/``.yaml`` under an allowed root.

    The roots are ``$FAIRBALANCE_DATA_DIR/pipelines`` (where ``fairbalance
    run --queue`` puts the files it queues; a relative path is taken from
    there) and the folders listed in ``FAIRBALANCE_PIPELINE_DIRS`` (set on
    the workers). Any other path typed in the App is refused, so the App
    cannot make a worker read its files.
    """
    from fairbalance.core import config

    roots = [os.path.realpath(os.path.join(config.data_dir(), "pipelines"))] + [
        os.path.realpath(p) for p in os.environ.get(PIPELINE_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    real = os.path.realpath(os.path.join(roots[0], os.path.expanduser(str(path))))
    if not real.endswith((".yml", ".yaml")) or not any(os.path.commonpath([r, real]) == r for r in roots):
        raise validation.FairBalanceError(
            f"{path!r} is not a pipeline file the App may run: put the .yml file under {roots[0]} (or a folder "
            f"listed in {PIPELINE_DIRS_ENV} on the workers), or run it with `fairbalance run FILE`")
    return real


def copy_pipeline(path: str, dataset_name: str) -> str:
    """A copy of pipeline file ``path`` in ``$FAIRBALANCE_DATA_DIR/pipelines/<dataset>/`` (what ``--queue`` queues).

    The copy keeps its file name (a pipeline's record is named after it) in a
    folder named by its content, so the queued operation runs the file as it
    was when queued, and it lies under the root the operator allows.
    """
    with open(path, "rb") as f:
        data = f.read()
    folder = default_folder("pipelines", dataset_name, hashlib.sha1(data).hexdigest()[:12])
    os.makedirs(folder, exist_ok=True)
    stem = safe_name(os.path.splitext(os.path.basename(path))[0])
    target = os.path.join(folder, f"{stem}.yml")
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target
