"""What happens before any data moves: the plan of an extraction.

SQL text and literals (``sql``), PostgreSQL-to-Arrow types (``pgtypes``), catalog queries
(``catalog``), the plan and its chunk statements (``plan``), incremental windows (``incremental``)
and their state between runs (``watermark_state``), key ranges for fan-out (``key_ranges``) and
snapshot export (``snapshot``). These run in the parent on its own psycopg connection.

May import: the shared leaves (``exceptions``, ``conninfo``, ``querylog``, ``durations``) and each
other; never ``run``, ``supervisor``, ``output``, ``hooks`` or ``operators``.
"""
