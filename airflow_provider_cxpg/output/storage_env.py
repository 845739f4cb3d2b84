"""Object-storage access for the worker, as the parent has it, without a secret in its environment.

The worker's environment is an allowlist (see :mod:`~airflow_provider_cxpg.supervisor.session`), so
the ambient credentials of an
Airflow host would not reach the process that uploads chunk files, and an Airflow connection's
filesystem (``destination_conn_id``: s3fs with an aiobotocore session) cannot be pickled to it. So,
for the destination's protocol:

* **S3** (``s3://``, ``s3a://``): the parent resolves the credentials itself, through the
  connection's session or botocore's own chain (environment keys, profiles and SSO, web identity
  and IRSA, EKS Pod Identity and ECS container credentials, EC2 instance metadata), and sends the
  access key, secret and session token over the worker's private pipe with each chunk, renewed by
  botocore before they expire. Non-secret settings (region, endpoint, CA bundle, profile name) go
  to the worker's environment.
* **GCS** and **Azure**: secret values (account keys, connection strings, SAS tokens, client
  secrets) found in the parent's environment become fsspec options over the pipe; paths to
  credential or token files and identity ids go to the environment, and the worker's SDK reads them
  (Google's application-default credentials and metadata server, Azure workload identity).
* Options given explicitly (``storage_options``, or resolved from ``destination_conn_id``) win; an
  option that cannot be sent to another process is refused before any data moves.

Proxies and CA bundles (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``...) are in the
worker's allowlist.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import Mapping
from typing import Any

from airflow_provider_cxpg.exceptions import InvalidInputError

__all__ = ["WorkerStorage", "worker_storage"]

# protocol -> (environment secret -> storage option, non-secret environment names)
_AWS_PLAIN = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_S3_ADDRESSING_STYLE",
)
_GCP: tuple[dict[str, str], tuple[str, ...]] = (
    {},
    ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG", "GCE_METADATA_HOST"),
)
_AZURE = (
    {
        "AZURE_STORAGE_ACCOUNT_KEY": "account_key",
        "AZURE_STORAGE_CONNECTION_STRING": "connection_string",
        "AZURE_STORAGE_SAS_TOKEN": "sas_token",
        "AZURE_CLIENT_SECRET": "client_secret",
    },
    (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_AUTHORITY_HOST",
    ),
)
_BY_PROTOCOL: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "gs": _GCP,
    "gcs": _GCP,
    "abfs": _AZURE,
    "abfss": _AZURE,
    "az": _AZURE,
    "adl": _AZURE,
}
_S3 = frozenset({"s3", "s3a"})
#: s3fs options that already say how to authenticate (nothing to resolve in the parent).
_S3_EXPLICIT = ("key", "secret", "token", "anon", "profile")
_SECRET_OPTIONS = ("key", "secret", "token", "account_key", "connection_string", "sas_token", "client_secret")


class WorkerStorage:
    """What the worker needs to write chunk files: fsspec options (fresh credentials), env, secrets.

    :param url: the destination URL.
    :param storage_options: the options the parent resolved (explicit, or from an Airflow
        connection's filesystem; a boto/aiobotocore ``session`` in them is resolved here).
    :param environ: the parent's environment (default ``os.environ``).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any], environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
        options = dict(storage_options)
        self._session = options.pop("session", None)  # an Airflow connection's aiobotocore session
        self._credentials: Any = None
        self.env: dict[str, str] = {}
        if self.protocol in _S3:
            self.env = {name: environ[name] for name in _AWS_PLAIN if environ.get(name)}
            if not any(options.get(o) for o in _S3_EXPLICIT):
                self._credentials = self._aws_credentials(options)
        else:
            secret_map, plain = _BY_PROTOCOL.get(self.protocol, ({}, ()))
            if not any(option in options for option in secret_map.values()):
                for env_name, option in secret_map.items():
                    if environ.get(env_name):
                        options[option] = environ[env_name]
            self.env = {name: environ[name] for name in plain if environ.get(name)}
        self._static = options
        self._check_picklable(self.options())

    def _aws_credentials(self, options: Mapping[str, Any]) -> Any:
        """Credentials from the connection's session, or botocore's default chain (None: anonymous)."""
        if self._session is not None:
            found = self._session.get_credentials()
            return asyncio.run(found) if asyncio.iscoroutine(found) else found
        import botocore.session

        return botocore.session.get_session().get_credentials()

    def options(self) -> dict[str, Any]:
        """The options for the next chunk's sink (refreshable credentials are renewed by botocore)."""
        options = dict(self._static)
        credentials = self._credentials
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            if asyncio.iscoroutine(frozen):  # aiobotocore's refreshable credentials
                frozen = asyncio.run(frozen)
            options.update(key=frozen.access_key, secret=frozen.secret_key)
            if frozen.token:
                options["token"] = frozen.token
        return options

    @staticmethod
    def secrets_of(options: Mapping[str, Any]) -> list[str]:
        return [options[o] for o in _SECRET_OPTIONS if isinstance(options.get(o), str) and options[o]]

    def _check_picklable(self, options: Mapping[str, Any]) -> None:
        bad = []
        for name, value in options.items():
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001  anything that cannot cross to the worker
                bad.append(name)
        if bad:
            raise InvalidInputError(
                f"storage option(s) {sorted(bad)} cannot be sent to the worker process (not picklable): pass plain "
                "values (credentials, endpoint) in storage_options instead"
            )


def worker_storage(
    url: str, storage_options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Return (storage options, extra worker environment, secrets to redact) for ``url``, once."""
    storage = WorkerStorage(url, storage_options, environ)
    options = storage.options()
    return options, storage.env, storage.secrets_of(options)
