"""Extraction and cleaning as Prefect tasks.

``read_contacts`` opens the source lazily (cheap; never cached). ``clean_contacts`` runs the polars transform and is
cached on the source's content fingerprint, the mapping file's content, the phone region and the transform's code,
so a retried or repeated flow run over unchanged input does not recompute it. Changing any of those (or
``PREFECT_TASKS_REFRESH_CACHE=true``) computes it again.
"""

from __future__ import annotations

import hashlib
import inspect
from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from apollo_sync import expressions, transform
from apollo_sync import mapping as mapping_module
from apollo_sync.sources import Source, SourceOptions, read_source

_TRANSFORM_CODE = hashlib.sha256(
    "".join(inspect.getsource(module) for module in (transform, mapping_module, expressions)).encode()
).hexdigest()[:16]
"""Changes to the cleaning code invalidate cached results, like Prefect's TASK_SOURCE but for the whole transform."""


@task(name="read_source", cache_policy=NO_CACHE, persist_result=False)
def read_contacts(spec: str, options: SourceOptions) -> Source:
    """Open ``spec`` as a lazy frame of text columns with a content fingerprint."""
    return read_source(spec, options)


def _clean_cache_key(ctx: TaskRunContext, params: dict) -> str:
    source: Source = params["source"]
    mapping_path = params.get("mapping_path")
    mapping_digest = hashlib.sha256(Path(mapping_path).read_bytes()).hexdigest() if mapping_path else "none"
    parts = "|".join([source.fingerprint, mapping_digest, params.get("phone_region") or "", _TRANSFORM_CODE])
    return f"{ctx.task.name}-{hashlib.sha256(parts.encode()).hexdigest()}"


@task(
    name="clean_contacts",
    cache_key_fn=_clean_cache_key,
    cache_expiration=timedelta(days=1),
    persist_result=True,
)
def clean_contacts(source: Source, mapping_path: str | None, phone_region: str) -> transform.Prepared:
    """Map headers, clean, validate and dedupe the source's rows (see ``apollo_sync.transform``)."""
    mapping = transform.load_mapping(mapping_path) if mapping_path else None
    return transform.prepare(source.frame, mapping=mapping, phone_region=phone_region)
