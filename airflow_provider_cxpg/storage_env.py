"""Object-storage credentials for the worker without putting secrets in its environment.

The worker's environment is an allowlist (see :mod:`.supervisor`), so the usual ambient credentials
of an Airflow host (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, IRSA's role and token file, Google's
credentials file, Azure keys) would not reach the process that uploads chunk files. For the
destination's protocol only:

* secret values (access keys, session tokens, account keys, connection strings, client secrets)
  become fsspec ``storage_options`` and travel over the worker's private pipe;
* non-secret settings (profile names, regions, role ARNs, paths to token or credential files,
  endpoints) are passed as environment variables, which the SDKs read themselves.

Options given explicitly (``storage_options`` or an Airflow connection) always win.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["worker_storage"]

# protocol -> (environment secret -> storage option, non-secret environment names)
_AWS = (
    {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"},
    (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
        "AWS_STS_REGIONAL_ENDPOINTS",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ),
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
    "s3": _AWS,
    "s3a": _AWS,
    "gs": _GCP,
    "gcs": _GCP,
    "abfs": _AZURE,
    "abfss": _AZURE,
    "az": _AZURE,
    "adl": _AZURE,
}


def worker_storage(
    url: str, storage_options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Return (storage options, extra worker environment, secrets to redact) for ``url``."""
    environ = os.environ if environ is None else environ
    options = dict(storage_options)
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    secret_map, plain = _BY_PROTOCOL.get(protocol, ({}, ()))
    secrets: list[str] = []
    if not any(option in options for option in secret_map.values()):
        for env_name, option in secret_map.items():
            if environ.get(env_name):
                options[option] = environ[env_name]
    for option in secret_map.values():
        if isinstance(options.get(option), str):
            secrets.append(options[option])
    env = {name: environ[name] for name in plain if environ.get(name)}
    return options, env, secrets
