"""One stable asset per extraction target, with each run's output in the event.

A destination is usually templated (``s3://lake/raw/orders/{{ run_id }}``), so the directory a run
writes to is known only when it runs. Emitting that directory as the asset would make a new asset
every run (and, on Airflow 3, two warnings from Airflow for each: "AssetModel ... not found",
"Emitting event for inactive AssetModel"). The target is the destination's *static* part instead:
everything before the first template expression, without a trailing ``/``
(``s3://lake/raw/orders``; ``s3://lake/raw/orders_{{ ds }}`` gives ``s3://lake/raw/orders_``, and a
Hive-style ``s3://lake/raw/orders/dt={{ ds }}`` gives ``s3://lake/raw/orders``).
It is known when the DAG is parsed, so it is an ordinary outlet that Airflow registers with the
DAG, on Airflow 2.11 and 3.x alike; each event carries the run's own prefix (``prefix``) and its
counts as extra. A fanned-out dataset is one asset too, emitted by the
validator once the dataset is proven complete; its ranges emit none.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from urllib.parse import quote

from airflow_provider_cxpg.exceptions import InvalidInputError
from airflow_provider_cxpg.output.destination import local_path
from airflow_provider_cxpg.version_compat import AIRFLOW_V_3_0_PLUS

__all__ = ["asset_uri", "record_asset_event", "stable_asset"]


def asset_uri(destination: str) -> str:
    """A destination as an asset URI: URLs as they are, local paths as ``file://`` URLs.

    ``file:/p``, ``file://localhost/p`` and ``/p`` are one folder, so one asset: ``file:///p``.
    """
    destination = destination.rstrip("/") or "/"
    if destination.startswith("file:"):
        with contextlib.suppress(InvalidInputError):  # a bad one is refused when the task runs, not here
            destination = local_path(destination)
    if "://" in destination:
        return destination
    return "file://" + quote(os.path.abspath(os.path.expanduser(destination)))  # as Destination resolves it


def _static_part(destination: Any) -> str | None:
    text = destination if isinstance(destination, str) else str(destination)
    starts = [i for i in (text.find("{{"), text.find("{%"), text.find("{#")) if i >= 0]
    if not starts:
        return text
    head = text[: min(starts)]
    slash = head.rfind("/")
    scheme = text.find("://")
    if scheme >= 0 and slash <= scheme + 2:  # a template in the bucket or host: no static target
        return None
    partial = head[slash + 1 :]
    # "raw/orders_{{ ds }}" and "raw/items_{{ ds }}" are two targets: keep the partial segment. A
    # Hive-style "raw/orders/dt={{ ds }}" is a folder of the target "raw/orders".
    static = head[:slash] if not partial or partial.endswith("=") else head
    static = static.rstrip("/")
    return static or None


def _asset(asset_class: Any, uri: str) -> Any:
    # Airflow 3's Asset has a name (the URI, so the UI shows where the data is); Airflow 2's Dataset has none.
    return asset_class(uri=uri, name=uri) if AIRFLOW_V_3_0_PLUS else asset_class(uri=uri)


def stable_asset(destination: Any) -> Any | None:
    """The asset of a destination (template): its static part, or None when there is none."""
    static = _static_part(destination)
    if not static:
        return None
    from airflow.providers.common.compat.sdk import Asset

    uri = asset_uri(static)
    return _asset(Asset, uri)


def record_asset_event(context: Any, outlets: list[Any], prefix: str, extra: dict[str, Any], log: Any) -> None:
    """Add this run's prefix and counts to the events of the task's asset outlets."""
    events = context.get("outlet_events") if hasattr(context, "get") else None
    if events is None:
        return
    from airflow.providers.common.compat.sdk import Asset, AssetAlias

    payload = {"prefix": asset_uri(prefix), **{k: v for k, v in extra.items() if v is not None}}
    for outlet in outlets or []:
        try:
            if isinstance(outlet, AssetAlias):  # an alias the user chose: the run's own prefix
                events[outlet].add(_asset(Asset, asset_uri(prefix)), extra=payload)
            elif isinstance(outlet, Asset):
                events[outlet].extra.update(payload)
        except Exception as exc:  # noqa: BLE001  lineage must never fail an extraction
            log.warning("could not record the asset event for %s: %s", prefix, exc)
