"""The body Apollo gets for each contact, and the fingerprint that tells a re-run what changed.

:func:`with_payload` writes each contact's JSON object (its non-null Apollo fields, custom fields under
``typed_custom_fields``) at load time, for the rows actually sent: a re-run of an unchanged export builds none.
:func:`contact_fingerprint` is computed for every contact by :func:`apollo_sync.clean.prepare` and kept in
the ledger; it reads the cleaned columns directly, so it costs a hash per field value and no text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import polars as pl

from apollo_sync.clean.mapping import CUSTOM_PREFIX, MAPPABLE_FIELDS

__all__ = [
    "with_payload", "contact_fingerprint", "contact_field_hashes", "field_weight", "json_string", "parse_field_hashes",
    "payload_fields",
]

_JSON_ESCAPES = {"\\": "\\\\", '"': '\\"', **{chr(i): f"\\u{i:04x}" for i in range(32)}}


def json_string(expr: pl.Expr) -> pl.Expr:
    """A string expression as a JSON string literal (quotes included); null stays null.

    One Aho-Corasick pass escapes backslash, quote and control characters, as JSON requires
    (non-ASCII passes through as UTF-8). ~2x faster than a json_encode per field on 1M rows.
    """
    escaped = expr.str.replace_many(list(_JSON_ESCAPES), list(_JSON_ESCAPES.values()))
    return pl.lit('"') + escaped + pl.lit('"')


def json_member(name: str, key: str | None = None, *, escape: bool = True) -> pl.Expr:
    """``"key":<json value>`` for a non-null String or List(String) column, else null.

    ``escape=False`` when the column holds no character JSON escapes (see :func:`needs_escape`): the value is
    then only quoted, which gives the same text without an escaping pass over every value.
    """
    key = key or name
    if name == "label_names":
        quote = json_string if escape else (lambda e: pl.concat_str([pl.lit('"'), e, pl.lit('"')]))
        items = pl.col(name).list.eval(quote(pl.element())).list.join(",")
        return pl.concat_str([pl.lit(f'"{key}":['), items, pl.lit("]")])
    if escape:
        return pl.concat_str([pl.lit(f'"{key}":'), json_string(pl.col(name))])
    return pl.concat_str([pl.lit(f'"{key}":"'), pl.col(name), pl.lit('"')])  # one allocation; null stays null


_JSON_SPECIAL = r'[\\"\x00-\x1f]'
"""A character :func:`json_string` escapes (backslash, quote, control characters)."""


def needs_escape(column: pl.Series) -> bool:
    """True when some value of a String or List(String) column holds a character JSON must escape."""
    values = column.explode() if isinstance(column.dtype, pl.List) else column
    return bool(values.str.contains(_JSON_SPECIAL).any())


def json_object(members: list[pl.Expr]) -> pl.Expr:
    """``{...}`` of the non-null members, null when all are null."""
    body = pl.concat_str(members, separator=",", ignore_nulls=True)
    return pl.when(body.str.len_bytes() > 0).then(pl.lit("{") + body + pl.lit("}"))


def payload_fields(columns: Sequence[str]) -> list[str]:
    """The columns of a contacts frame that feed its payload and fingerprint: Apollo fields, then ``custom.*``."""
    present = set(columns)
    return [f for f in MAPPABLE_FIELDS if f in present] + [c for c in columns if c.startswith(CUSTOM_PREFIX)]


def with_payload(contacts: pl.DataFrame) -> pl.DataFrame:
    """``contacts`` (prepare()'s columns) with a ``payload`` column: the JSON text Bulk Create gets per contact.

    Only non-null fields are written, in :data:`~apollo_sync.clean.mapping.MAPPABLE_FIELDS` order, then
    ``typed_custom_fields`` from the ``custom.<id>`` columns. Columns with nothing to escape are only quoted.
    """
    fields = payload_fields(contacts.columns)
    present = {c for c in fields if contacts.get_column(c).null_count() < contacts.height}
    escape = {c: needs_escape(contacts.get_column(c)) for c in present}
    members = [json_member(f, escape=escape[f]) for f in fields if f in present and not f.startswith(CUSTOM_PREFIX)]
    customs = [c for c in fields if c in present and c.startswith(CUSTOM_PREFIX)]
    if customs:
        custom_object = json_object([json_member(c, c[len(CUSTOM_PREFIX):], escape=escape[c]) for c in customs])
        members.append(pl.when(custom_object.is_not_null()).then(pl.lit('"typed_custom_fields":') + custom_object))
    if members:
        payload = pl.lit("{") + pl.concat_str(members, separator=",", ignore_nulls=True) + pl.lit("}")
    else:
        payload = pl.lit("{}")
    return contacts.with_columns(payload.alias("payload"))


def field_weight(name: str) -> int:
    """The odd 64-bit multiplier of field ``name`` in :func:`contact_fingerprint` (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") | 1


def contact_fingerprint(fields: Sequence[str]) -> pl.Expr:
    """A 64-bit fingerprint of each contact's cleaned ``fields``, as a decimal string; stable across versions.

    fingerprint = sum over the fields with a value of ``field_weight(name) * (h(value) + 1)`` modulo 2**64,
    where h is the unsigned 32-bit MurmurHash3 (x86_32, seed 0) of the value's UTF-8 bytes, and for
    ``label_names`` (a set to Apollo) the sum of h over its labels. MurmurHash3 is the hash the Iceberg spec
    fixes for its bucket transform, so its values cannot change with a polars release (polars' own ``hash``
    may); :func:`apollo_sync.clean.rules.fingerprint` is the whole sum in pure Python, the reference the tests
    check this against. A null field adds nothing, so adding a field to apollo-sync later leaves existing
    fingerprints alone. The weights are odd, so changing one field always changes the sum unless that field's two
    values share a 32-bit hash (odds 1 in 2**32 per changed value); a fingerprint is only compared with the same
    contact's previous one. Vectorised: ~0.15 s of CPU for 1M contacts of 11 fields, where building the JSON
    payload for every contact and hashing it took ~1.1 s.
    """
    one = pl.lit(1, dtype=pl.UInt64)
    terms = []
    for name in fields:
        if name == "label_names":
            hashed = pl.col(name).list.eval(_mm3(pl.element())).list.sum()
        else:
            hashed = _mm3(pl.col(name))
        terms.append(((hashed + one) * pl.lit(field_weight(name), dtype=pl.UInt64)).fill_null(0))
    total = pl.sum_horizontal(terms) if terms else pl.lit(0, dtype=pl.UInt64)
    return total.cast(pl.UInt64).cast(pl.String)


def contact_field_hashes(fields: Sequence[str], labels: Sequence[str] = ()) -> pl.Expr:
    """Each contact's cleaned ``fields`` as ``name=hash`` pairs joined by ``;``: the fields with a value only, each
    hashed as for :func:`contact_fingerprint`. ``label_names`` hashes the set of the row's labels and ``labels`` (the
    run's, which every contact also gets). The ledger keeps this for each contact Apollo confirmed, so an upsert
    sends only the fields whose value changed since (:func:`parse_field_hashes`)."""
    terms = []
    for name in fields:
        if name == "label_names":
            continue
        terms.append(pl.lit(f"{name}=") + _mm3(pl.col(name)).cast(pl.String))
    if "label_names" in fields or labels:
        row_labels = pl.col("label_names").fill_null([]) if "label_names" in fields else pl.lit([], pl.List(pl.String))
        every = pl.concat_list([row_labels, pl.lit(list(labels), pl.List(pl.String))]).list.unique()
        hashed = every.list.eval(_mm3(pl.element())).list.sum()
        terms.append(pl.when(every.list.len() > 0).then(pl.lit("label_names=") + hashed.cast(pl.String)))
    if not terms:
        return pl.lit("", pl.String)
    return pl.concat_str(terms, separator=";", ignore_nulls=True)


def parse_field_hashes(text: str | None) -> dict[str, str] | None:
    """``contact_field_hashes`` text as {field: hash}; None for None (nothing known)."""
    if text is None:
        return None
    return dict(item.split("=", 1) for item in text.split(";") if item)


def _mm3(expr: pl.Expr) -> pl.Expr:
    """The unsigned 32-bit MurmurHash3 of each string, as UInt64 (polars gives it as a signed Int32)."""
    return expr._mm3_hash().reinterpret(signed=False).cast(pl.UInt64)
