"""The worker process environment: an allowlist, the import path, the memory pool, no secret."""

from __future__ import annotations

import json
import threading

import pytest

from airflow_provider_cxpg.supervisor.process import worker_environment


def test_the_worker_environment_carries_proxies_and_ca_bundles_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "169.254.169.254,.internal")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "pod-identity-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    env = worker_environment()
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128" and env["no_proxy"].endswith(".internal")
    assert env["REQUESTS_CA_BUNDLE"] == "/etc/ssl/corp.pem"
    assert "pod-identity-token" not in json.dumps(env) and "aws-secret" not in json.dumps(env)


def test_ambient_aws_credentials_are_resolved_in_the_parent_and_sent_over_the_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever botocore's chain finds in the parent (here: the environment) reaches the worker as options."""
    from airflow_provider_cxpg.output.storage_env import WorkerStorage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPARENTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "parent-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "parent-token")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    storage = WorkerStorage("s3://b/p", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}})
    options = storage.options()
    assert (options["key"], options["secret"], options["token"]) == ("AKIAPARENTKEY", "parent-secret", "parent-token")
    assert storage.env == {"AWS_REGION": "eu-west-1"}  # no secret in the environment
    with pytest.raises(Exception, match="cannot be sent to the worker"):
        WorkerStorage("s3://b/p", {"key": "k", "secret": "s", "opener": threading.Lock()})


def test_worker_environment_prefers_jemalloc_unless_worker_env_names_a_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")  # the host's choice is not inherited
    monkeypatch.setenv("AIRFLOW_CONN_SECRET", "postgresql://u:p@h/db")
    env = worker_environment()
    assert env["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc" and "AIRFLOW_CONN_SECRET" not in env
    assert worker_environment({"ARROW_DEFAULT_MEMORY_POOL": "system"})["ARROW_DEFAULT_MEMORY_POOL"] == "system"
