"""A stand-in for Airflow's task process, run as its own process by the supervision tests.

It does what Airflow's task runner does around ``execute``: a SIGTERM handler that calls
``on_kill`` (``task_runner.py``), and ``execution_timeout`` as a SIGALRM that raises
``AirflowTaskTimeout`` and then calls ``on_kill``. A test can then SIGKILL it (as the OOM killer or
the supervisor's last escalation does), SIGTERM its process group, or let its timeout fire, and
inspect what is left on the server. The operator's arguments come as JSON in argv[1]; the
structured query log goes to ``query_log_path``.

``before_execute`` (seconds) stands for what Airflow 3's runner does between installing its SIGTERM
handler and calling ``execute`` (clearing XComs, rendering templates, ``pre_execute``);
``connection_lookup`` (seconds) for a slow secrets backend inside ``execute``, before there is an
extraction to stop.

``CXPG_TEST_NO_LIVENESS=1`` makes the provider behave as on a server without
``client_connection_check_interval`` (PostgreSQL 13 and older), to test the fallback.
``CXPG_TEST_TOKEN_FILE=<path>`` stands in for an IAM token service: each token minted is that
file's content at the time (a test rotates the role's password and rewrites the file).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> None:
    arguments = json.loads(sys.argv[1])
    timeout = arguments.pop("execution_timeout", None)
    before_execute = float(arguments.pop("before_execute", 0))
    connection_lookup = float(arguments.pop("connection_lookup", 0))
    if connection_lookup:
        from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

        lookup = ConnectorXPostgresHook.get_connection

        def slow_lookup(cls: type, conn_id: str) -> object:
            time.sleep(connection_lookup)
            return lookup(conn_id)

        ConnectorXPostgresHook.get_connection = classmethod(slow_lookup)  # type: ignore[method-assign,assignment]
    if os.environ.get("CXPG_TEST_NO_LIVENESS") == "1":
        import airflow_provider_cxpg.conninfo as conninfo
        import airflow_provider_cxpg.supervisor.session as supervisor

        for module in (conninfo, supervisor):  # conninfo.connect and the worker's session settings
            module.liveness_settings = lambda version: {}  # type: ignore[attr-defined]

    token_file = os.environ.get("CXPG_TEST_TOKEN_FILE")
    if token_file:
        from airflow_provider_cxpg.hooks.connectorx import ConnectorXPostgresHook

        def get_iam_token(self: object, conn: object) -> tuple[str, str, int]:
            login, token, port = open(token_file, encoding="utf-8").read().split()
            return login, token, int(port)

        ConnectorXPostgresHook.get_iam_token = get_iam_token  # type: ignore[method-assign,assignment]

    from airflow_provider_cxpg.operators.extract import PostgresExtractOperator

    op = PostgresExtractOperator(task_id="t", **arguments)
    signal.signal(signal.SIGTERM, lambda s, f: op.on_kill())
    print("ready", flush=True)
    time.sleep(before_execute)
    try:
        if timeout:
            from airflow.providers.common.compat.sdk import AirflowTaskTimeout

            def alarm(signum: int, frame: object) -> None:
                raise AirflowTaskTimeout("Timeout")

            signal.signal(signal.SIGALRM, alarm)
            signal.setitimer(signal.ITIMER_REAL, float(timeout))
            try:
                op.execute({})
            except AirflowTaskTimeout:
                op.on_kill()
                raise
        else:
            op.execute({})
    except BaseException as exc:
        print(f"failed {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
    print("done", flush=True)


if __name__ == "__main__":
    main()
