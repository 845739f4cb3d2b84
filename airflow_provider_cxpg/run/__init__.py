"""Driving an extraction: the loop that turns a plan into committed chunks.

``extraction`` (one extraction: plan, worker, chunks, manifest, resume), ``chunking`` (keyset and
page chunks, the read-ahead pipeline), ``reads`` (``iter_chunks`` and ``read_arrow`` into the
caller), ``parallel`` (key ranges read by several extractions), ``progress`` (the progress line),
``options`` (``ExtractOptions``/``ParquetOptions``: chunking, restarts and encoding, validated
once) and ``tables`` (one extraction committed as one lakehouse table version).

May import: ``planning``, ``supervisor``, ``output``, ``worker.protocol`` and the shared leaves;
never ``hooks`` or ``operators`` (those import this).
"""
