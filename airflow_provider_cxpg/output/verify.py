"""The output check: every file a manifest lists is there, whole, and written by that extraction.

A manifest that says "complete" is a promise about files, so the check reads the files, not the
manifest's own sums (which would agree with themselves whatever happened to the files). For each
committed chunk it compares, from one listing and each file's Parquet footer (no data pages read):

* the file exists, and its size is the size the worker reported when it committed it;
* the footer's row count is the chunk's row count;
* the footer's ``cxpg.run_id`` and ``cxpg.chunk`` name this extraction and this chunk, so a file
  from another run or another chunk, copied or renamed into place, is foreign.

An extraction runs the check on its own files before it reports success; a resumed one runs it on
the chunks it keeps (and starts over when one is damaged); the fan-out validator runs it on every
range.
"""

from __future__ import annotations

from airflow_provider_cxpg.exceptions import StorageError
from airflow_provider_cxpg.output.destination import DamagedFile, Destination
from airflow_provider_cxpg.output.manifest import Manifest, read_by_readers

__all__ = ["FOOTER_CHUNK", "FOOTER_RUN_ID", "check_output", "output_problems", "unlisted_files"]

FOOTER_RUN_ID = "cxpg.run_id"
FOOTER_CHUNK = "cxpg.chunk"


def output_problems(destination: Destination, manifest: Manifest) -> list[str]:
    """What is wrong with the files ``manifest`` lists (empty: every file is as committed)."""
    sizes = destination.list_entries()
    problems: list[str] = []
    for entry in manifest.chunks:
        if not entry.file:
            continue
        where = f"{destination.child_url(entry.file)} (chunk {entry.index})"
        if entry.file not in sizes:
            problems.append(f"{where}: missing")
            continue
        wrong: list[str] = []
        if entry.bytes and sizes[entry.file] != entry.bytes:
            wrong.append(f"{sizes[entry.file]} bytes, the manifest records {entry.bytes}")
        try:
            rows, meta = destination.read_footer(entry.file)
        except StorageError as exc:
            if not _damaged(exc):
                raise  # the store did not answer (a 500, a denied or timed-out read): not the file's fault
            problems.append(f"{where}: not a readable Parquet file ({exc})")
            continue
        if rows != entry.rows:
            wrong.append(f"holds {rows} rows, the manifest records {entry.rows}")
        if meta.get(FOOTER_RUN_ID) != manifest.run_id or meta.get(FOOTER_CHUNK) != str(entry.index):
            wrong.append(
                f"written by run {meta.get(FOOTER_RUN_ID)!r} as chunk {meta.get(FOOTER_CHUNK)!r}, "
                f"not by run {manifest.run_id!r} as chunk {entry.index}: a foreign file"
            )
        if wrong:
            problems.append(f"{where}: " + "; ".join(wrong))
    return problems


def unlisted_files(destination: Destination, manifest: Manifest) -> list[str]:
    """Files and folders at ``destination`` that every dataset reader reads and ``manifest`` does not list
    (a chunk copied beside its original, another tool's file): rows read twice, or rows of another run."""
    listed = set(manifest.files)
    return read_by_readers([n for n in destination.list_names() if n not in listed], destination.list_dirs())


def _damaged(error: StorageError) -> bool:
    """Whether a footer read failed on the file itself (gone, cut short, not Parquet) rather than the store.

    A retry that took one refused read for damage started over, deleting every committed chunk.
    """
    cause = error.__cause__
    # Classified by where it failed, not by the exception's class: pyarrow reports some unparsable
    # footers as OSError, as a store's client reports a refused read.
    return isinstance(cause, (DamagedFile, FileNotFoundError, IsADirectoryError, NotADirectoryError))


def check_output(destination: Destination, manifest: Manifest) -> None:
    """Raise :class:`StorageError` naming every file that does not match ``manifest``, and every file a
    reader would read beside them."""
    problems = output_problems(destination, manifest)
    problems.extend(
        f"{destination.child_url(n)}: not in the manifest, and readers read it"
        for n in unlisted_files(destination, manifest)
    )
    if problems:
        raise StorageError(
            f"the output at {destination.url} does not match its manifest: "
            + "; ".join(problems[:20])
            + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""),
            problems=problems,
            destination=destination.url,
        )
