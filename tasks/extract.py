"""The cached cleaning task (opening the source, lazy and cheap, is ``tasks.steps.read_contacts``).

``clean_contacts`` runs the polars transform and is cached on the source's content fingerprint, the mapping
file's content, the phone region and the transform's code, so a retried or repeated flow run over unchanged input
does not recompute it. Changing any of those (or
``PREFECT_TASKS_REFRESH_CACHE=true``) computes it again.

With ``prepared_dir`` (the flow passes ``<state_dir>/prepared``) the transform writes its results as Parquet parts
in ``<prepared_dir>/<cache digest>/`` and returns LazyFrames over them, so memory stays bounded on 10M-row sources
and the cached result is a few paths, not the rows. Those parts outlive the run like the ledger does; the cache key
names one generation of them (a token written with them), so a cached result never points at missing parts, and parts older than the cache expiration are pruned.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import shutil
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import polars as pl

from prefect import task
from prefect.context import TaskRunContext

from apollo_sync import clean
from apollo_sync.files import locked, private_dir, private_tree, touch_private
from apollo_sync.sources import Source

_CLEAN_MODULES = [
    clean, *(importlib.import_module(f"{clean.__name__}.{m.name}") for m in pkgutil.iter_modules(clean.__path__))
]
_TRANSFORM_CODE = hashlib.sha256(
    "".join(inspect.getsource(module) for module in sorted(_CLEAN_MODULES, key=lambda m: m.__name__)).encode()
).hexdigest()[:16]
"""Changes to the cleaning code (every module of apollo_sync.clean) invalidate cached results, like Prefect's
TASK_SOURCE but for the whole stage."""


CLEAN_CACHE_EXPIRATION = timedelta(days=1)


def _clean_digest(source: Source, mapping_path: str | None, phone_region: str | None) -> str:
    mapping_digest = hashlib.sha256(Path(mapping_path).read_bytes()).hexdigest() if mapping_path else "none"
    parts = "|".join([source.fingerprint, mapping_digest, phone_region or "", _TRANSFORM_CODE])
    return hashlib.sha256(parts.encode()).hexdigest()


def _clean_cache_key(ctx: TaskRunContext, params: dict) -> str:
    digest = _clean_digest(params["source"], params.get("mapping_path"), params.get("phone_region"))
    prepared_dir = params.get("prepared_dir")
    if not prepared_dir:
        return f"{ctx.task.name}-{digest}"
    parts_dir = Path(prepared_dir).resolve() / digest
    # The key names one generation of the parts: while they are whole it is the token written with them; when
    # they are gone a new token is promised to the run that writes them again, so a cached result never points
    # at missing files.
    if _whole(parts_dir):
        token = (parts_dir / _TOKEN).read_text(encoding="utf-8")
    else:
        token = uuid.uuid4().hex
        private_dir(parts_dir.parent)
        touch_private(parts_dir.parent / f"{digest}.{_TOKEN}").write_text(token, encoding="utf-8")
    return f"{ctx.task.name}-{hashlib.sha256(f'{digest}|{parts_dir}|{token}'.encode()).hexdigest()}"


_TOKEN = "cache-token"


@task(
    name="clean_contacts",
    cache_key_fn=_clean_cache_key,
    cache_expiration=CLEAN_CACHE_EXPIRATION,
    persist_result=True,
)
def clean_contacts(
    source: Source,
    mapping_path: str | None,
    phone_region: str,
    prepared_dir: str | None = None,
    on_ready: Callable[[pl.DataFrame], None] | None = None,
) -> clean.Prepared:
    """Map headers, clean, validate and dedupe the source's rows (see ``apollo_sync.clean``).

    With ``prepared_dir`` the results are Parquet parts under it and the Prepared's frames are LazyFrames.
    ``on_ready`` gets each final part of contacts as it is made (not called when the result comes from the cache:
    the caller then reads the stored parts).
    """
    mapping = clean.load_mapping(mapping_path) if mapping_path else None
    if not prepared_dir:
        return clean.prepare(source.frame, mapping=mapping, phone_region=phone_region, on_ready=on_ready)
    root = private_dir(Path(prepared_dir).resolve())
    final = root / _clean_digest(source, mapping_path, phone_region)
    clean.prune_prepared(root, CLEAN_CACHE_EXPIRATION.total_seconds(), keep=final)
    work = root / f"{final.name}.{uuid.uuid4().hex[:8]}.tmp"  # concurrent runs never write the same files
    prepared = clean.prepare(source.frame, mapping=mapping, phone_region=phone_region, out_dir=work, on_ready=on_ready)
    private_tree(work)
    with locked(root / f"{final.name}.lock"):  # one run at a time puts a generation in place
        if _whole(final):
            # Another run wrote the same digest (same rows, same rules) meanwhile and may be reading it: keep it.
            shutil.rmtree(work, ignore_errors=True)
        else:
            promised = root / f"{final.name}.{_TOKEN}"
            token = promised.read_text(encoding="utf-8") if promised.is_file() else uuid.uuid4().hex
            touch_private(work / _TOKEN).write_text(token, encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)  # a partial generation only
            work.rename(final)
            promised.unlink(missing_ok=True)
    return clean.reopen_parts(prepared, final)


def _whole(parts_dir: Path) -> bool:
    """A generation of parts that a run finished writing (its done marker and token are there)."""
    return (parts_dir / clean.DONE_MARKER).is_file() and (parts_dir / _TOKEN).is_file()
