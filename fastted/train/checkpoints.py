"""Checkpoint folders that prove themselves, checked by every rank for its share, and resumed on any number of ranks.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` (:func:`fastted.train.trainer.save_checkpoint` writes it under a
temporary name and renames it) closed by a ``manifest.json`` of every file's size and SHA-256.

Hashing per rank. Each rank hashes only its share of a checkpoint (:func:`file_owner`): the files it writes, which
carry its rank in their names (``rng-rank{r}.pt``, DeepSpeed's ``zero_pp_rank_{r}_...``), and rank 0 the shared
ones (model states, engine.json, config, trainer.json, DeepSpeed's scripts). Rank 0 gathers the records and writes
the manifest last (:func:`write_manifest`). On resume every rank checks that every file of the manifest is there
with its size (cheap) and hashes its share again, the files of ranks beyond this run's world going to rank
``r % world`` (:func:`verify_checkpoint`); the ranks agree on one verdict (the lowest rank's reason), so every
rank picks the same checkpoint and warns alike (:func:`latest_checkpoint`). Over all ranks, a save and a resume
each hash the checkpoint's bytes once. A resume on another number of ranks hashes what it reads: the first
converts the checkpoint (below), whose files it has checked, and hashes the universal form as it writes it; a
later one reads the DeepSpeed state from the universal form, so it hashes that and the checkpoint's other files,
checking the sizes of the state's (1.02x the checkpoint for 1.2M parameters, the excess a few hundred bytes of
header per parameter file).

Resharding. A checkpoint saved on N ranks under a ZeRO-partitioned optimizer (stages 1, 2, 3) resumes on M ranks
through DeepSpeed's universal checkpoint: every parameter's fp32 weights and Adam moments whole, one folder per
parameter, from which each rank of any world cuts its own partition (DeepSpeed's ``load_universal`` path, for
ZeRO 1 and 2 in ``stage_1_and_2`` and ZeRO 3 in ``stage3``; tested in fp32 on gloo CPU ranks for 2 -> 1 and
2 -> 4 ranks). Rank 0 converts a checkpoint once (:func:`universal_checkpoint`, DeepSpeed's
``ds_to_universal``) into its sub-folder ``universal``, written under a temporary name, closed by its own
manifest and renamed; a later resume on another world reuses it after checking it (its files' hashes shared out
between the ranks). fastted's own resharding was the alternative; DeepSpeed's is kept because its loaders already
cut partitions for every stage, and :meth:`fastted.train.engine.Engine.load` mends what they miss (the module's
buffers and extra state, and ZeRO-3's parameter-group settings and step counters). ZeRO-0 keeps whole optimizer
states in the model states and resumes natively on any world, as does any checkpoint on the world that saved it.
A checkpoint of another ZeRO stage is refused by name (the universal loading does not cross stages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from typing import Optional

from fastted.files import HashingWriter, sha256_file, write_atomic
from fastted.train.engine import STATE, CheckpointError, gather_over_ranks, saved_layout, weights_only_loads

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # the sub-folder of a checkpoint holding its universal form
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was passed over, or a torn metrics line dropped."""


def checkpoint_dir(directory: str) -> str:
    return os.path.join(directory, CHECKPOINTS)


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder's name ``step-N``; None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def file_owner(rel: str, world: int) -> int:
    """The rank that hashes a checkpoint file (``rel``, relative to the checkpoint) in a world of ``world``
    ranks: the rank in its name modulo ``world``, rank 0 for a shared file."""
    match = _RANK_FILE.search(os.path.basename(rel))
    return int(match.group(1)) % world if match else 0


def _folder_files(folder: str) -> list[str]:
    files = []
    for parent, _, names in os.walk(folder):
        files += [os.path.relpath(os.path.join(parent, n), folder) for n in names]
    return sorted(f for f in files if f != MANIFEST)


def _record(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def write_manifest(folder: str, rank: int = 0, world: int = 1, known: Optional[dict] = None) -> None:
    """Close a checkpoint folder by its ``manifest.json`` (every file's size and SHA-256, written last). Every rank
    of the ``world`` calls it and hashes its share (:func:`file_owner`); rank 0 gathers the records, hashes what
    no other rank did (a file another rank did not see yet) and writes the manifest. ``known``: {absolute path:
    record} of files hashed as they were written (:class:`fastted.files.HashingWriter`), taken where the size
    still matches instead of reading the file again."""
    known = known or {}

    def record_of(rel: str) -> dict:
        path = os.path.join(folder, rel)
        seen = known.get(os.path.abspath(path))
        return seen if seen is not None and seen["bytes"] == os.path.getsize(path) else _record(path)

    names = _folder_files(folder)
    mine = {rel: record_of(rel) for rel in names if file_owner(rel, world) == rank}
    shares = gather_over_ranks(mine) if world > 1 else [mine]
    if rank != 0:
        return
    files = {rel: record for share in shares for rel, record in share.items()}
    files.update({rel: record_of(rel) for rel in names if rel not in files})
    write_atomic(
        os.path.join(folder, MANIFEST), json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=1)
    )


def _check_files(
    folder: str,
    rank: int,
    owner: Callable[[str], int],
    required: tuple = (),
    hashed: Callable[[str], bool] = lambda rel: True,
) -> Optional[str]:
    """What is wrong with a folder by its manifest, seen from ``rank``: every file present with its size (checked by
    every rank), and the hashes of the files ``owner`` gives this rank, of those ``hashed`` selects (the files a
    resume reads); None when nothing is."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        records = sorted((rel, int(want["bytes"]), want["sha256"]) for rel, want in files.items())
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    for rel, size, _ in records:
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {size}"
    for rel, _, digest in records:
        if owner(rel) == rank and hashed(rel) and sha256_file(os.path.join(folder, rel)) != digest:
            return f"{rel} differs from the manifest's SHA-256 (corrupted)"
    for rel in required:
        if rel not in files:
            return f"{rel} is not in the manifest"
    return None


def _agreed(reason: Optional[str], world: int) -> Optional[str]:
    """The verdict of the ``world`` ranks: the lowest rank's reason, None when no rank has one (a collective when
    ``world`` > 1)."""
    return next((r for r in (gather_over_ranks(reason) if world > 1 else [reason]) if r is not None), None)


def _in_state(rel: str) -> bool:
    return rel.split(os.sep, 1)[0] == STATE


def _through_universal(folder: str, world: int) -> bool:
    """Whether a resume on ``world`` ranks reads the checkpoint's DeepSpeed state from its universal form, which
    exists (saved on another number of ranks by a ZeRO-partitioned optimizer), and not from its ``state``."""
    try:
        layout = saved_layout(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        layout["world"] != world
        and (layout["zero_stage"] or 0) > 0
        and os.path.isfile(os.path.join(folder, UNIVERSAL, MANIFEST))
    )


def verify_checkpoint(folder: str, rank: int = 0, world: int = 1) -> Optional[str]:
    """None when the checkpoint folder is intact (every file of its manifest there, with its size and hash, and a
    trainer.json), else what is wrong, in a few words: the same verdict on every rank of the ``world``, which
    must all call it (each hashes its share, :func:`file_owner`). A resume that will read the DeepSpeed state
    from the checkpoint's universal form (:func:`universal_checkpoint`, which checks that form) hashes the
    files of ``state`` only if that form must be made again; their sizes are checked here."""
    through = _through_universal(folder, world)
    return _agreed(
        _check_files(
            folder,
            rank,
            lambda rel: file_owner(rel, world),
            required=("trainer.json",),
            hashed=lambda rel: not (through and _in_state(rel)),
        ),
        world,
    )


def latest_checkpoint(directory: str, rank: int = 0, world: int = 1) -> Optional[str]:
    """The checkpoint a stage directory resumes from: the one ``latest`` names when it is intact, else the newest
    intact one (with a :class:`CheckpointWarning` naming what was passed over), or None when there is no
    checkpoint. Raises :class:`CheckpointError` when checkpoints exist but none is intact. Every rank of the
    ``world`` calls it and gets the same answer and warnings."""
    root = checkpoint_dir(directory)
    if not os.path.isdir(root):
        return None
    names = sorted(
        (n for n in os.listdir(root) if checkpoint_step(n) is not None and os.path.isdir(os.path.join(root, n))),
        key=checkpoint_step,
        reverse=True,
    )
    pointer, named = os.path.join(root, "latest"), None
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            named = f.read().strip()
        if checkpoint_step(named) is None:  # "../x", an absolute path: never leave checkpoints/
            warnings.warn(
                f"{pointer} names {named!r}, not a checkpoint folder step-N inside {root}: ignored",
                CheckpointWarning,
                stacklevel=2,
            )
            named = None
    if named is not None and named not in names:
        if not names:
            raise CheckpointError(
                f"{pointer} names {named}, which is not in {root}, and no other checkpoint is: "
                f"restore it, or set resume=false to start over"
            )
        warnings.warn(f"{pointer} names {named}, which is not in {root}", CheckpointWarning, stacklevel=2)
    if named in names:  # the pointer's checkpoint first, then the others newest first
        names.remove(named)
        names.insert(0, named)
    damaged = []
    for name in names:
        reason = verify_checkpoint(os.path.join(root, name), rank, world)
        if reason is None:
            if damaged:
                warnings.warn(
                    f"checkpoint {'; '.join(damaged)}: resuming from {name}, the newest intact one "
                    f"(the damaged ones are kept)",
                    CheckpointWarning,
                    stacklevel=2,
                )
            return os.path.join(root, name)
        damaged.append(f"{name} is damaged ({reason})")
    if damaged:
        raise CheckpointError(
            f"{root}: no intact checkpoint ({'; '.join(damaged)}): set resume=false to start over (nothing is deleted)"
        )
    return None


# --------------------------------------------------------------------------- resharding


def universal_checkpoint(folder: str, rank: int = 0, world: int = 1) -> str:
    """The universal form of the (verified) checkpoint ``folder``, its sub-folder ``universal``: reused when it is
    intact (sizes on every rank, hashes shared out by file), else made by rank 0 (the others wait). Every rank
    of the ``world`` calls it; raises :class:`CheckpointError` on every rank alike when it cannot be made."""
    target = os.path.join(folder, UNIVERSAL)
    reason = "absent"
    if os.path.isdir(target):
        checked_state = not _through_universal(folder, world)  # verify_checkpoint hashed the state: no form yet
        owners = {rel: i % world for i, rel in enumerate(_folder_files(target))}
        reason = _agreed(_check_files(target, rank, lambda rel: owners.get(rel, 0)), world)
        if reason is not None and not checked_state:  # made again from the state, which must be checked first
            damaged = _agreed(_check_files(folder, rank, lambda rel: file_owner(rel, world), hashed=_in_state), world)
            if damaged is not None:
                raise CheckpointError(
                    f"checkpoint {folder}: its universal form is damaged ({reason}), and so is "
                    f"its state ({damaged}): resume on {saved_layout(folder)['world']} ranks "
                    f"from another checkpoint, or resume=false to start over"
                )
    if reason is None:
        return target
    error = None
    if rank == 0:
        try:
            _convert(folder, target)
        except Exception as caught:  # DeepSpeed's conversion: any failure is reported by name on every rank
            error = f"{type(caught).__name__}: {(str(caught).splitlines() or [''])[0]}"
    error = _agreed(error, world)
    if error is not None:
        saved = saved_layout(folder)["world"]
        raise CheckpointError(
            f"checkpoint {folder}: saved on {saved} ranks, it could not be converted for {world} "
            f"({error}): resume on {saved} ranks, or resume=false to start over"
        )
    return target


def _convert(folder: str, target: str) -> None:
    """DeepSpeed's ds_to_universal on one process, quiet, every load weights-only, into ``target`` atomically; its
    files hashed as they are written (:func:`_hashed_writes`), so its manifest reads none of them again."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=os.path.join(folder, STATE),
        output_folder=os.path.join(tmp, STATE),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    written: dict = {}
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            with weights_only_loads(module_tensors_only=True), _hashed_writes(written):
                ds_to_universal.main(args)
        write_manifest(tmp, known=written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)


@contextlib.contextmanager
def _hashed_writes(records: dict):
    """Inside, every ``torch.save`` to a path and every ``shutil.copy2`` (DeepSpeed's conversion writes its files
    with these two) hashes the bytes on their way to the file, into ``records`` {absolute path: record}. A tensor
    saved as a value of a dict is saved alone, not with the rest of its storage: the conversion writes a parameter
    the optimizer holds no fragment of (one of two tied weights) from the loaded model states, where it is a view
    of the storage of every parameter, which ``torch.save`` would write whole (a second model in the universal
    form)."""
    import torch

    real_save, real_copy = torch.save, shutil.copy2

    def alone(value):
        if torch.is_tensor(value) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
            return value.clone()
        return value

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict):
            obj = {key: alone(value) for key, value in obj.items()}
        with open(f, "wb") as out:
            writer = HashingWriter(out)
            real_save(obj, writer, *args, **kwargs)
        records[os.path.abspath(f)] = writer.record()

    def copy2(src, dst, *args, **kwargs):
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src))
        with open(src, "rb") as source, open(dst, "wb") as out:
            writer = HashingWriter(out)
            shutil.copyfileobj(source, writer, 16 << 20)
        shutil.copystat(src, dst)
        records[os.path.abspath(dst)] = writer.record()
        return dst

    torch.save, shutil.copy2 = save, copy2
    try:
        yield
    finally:
        torch.save, shutil.copy2 = real_save, real_copy
