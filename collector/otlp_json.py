"""The OTLP/JSON encoding → protobuf messages.

OTLP/JSON is proto3 JSON with two differences that `json_format` does not
know: trace and span ids are hex (not base64), and receivers must ignore
unknown fields. Ids are rewritten to base64 before parsing.

Nesting is bounded (MAX_DEPTH): JSON nested thousands of levels deep would otherwise
exhaust the recursion of the decoder, the id rewrite or protobuf's parser.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

# AnyValue nests in AnyValue (arrays, kvlists) three JSON levels at a time, and protobuf's own
# limit of 100 messages stops that near 50: 200 JSON levels admit all it admits and stay far
# below Python's recursion limit.
MAX_DEPTH = 200
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


class InvalidJson(ValueError):
    pass


def parse(body: bytes, message_type: type[M]) -> M:
    try:
        document = json.loads(body)
    except ValueError as exc:
        # Not UTF-8, not JSON, or an integer longer than Python converts (int_max_str_digits).
        raise InvalidJson(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels") from exc
    if not isinstance(document, dict):
        raise InvalidJson("request body must be a JSON object")
    _rewrite_ids(document, 0)
    try:
        parsed: M = json_format.ParseDict(document, message_type(), ignore_unknown_fields=True)
        return parsed
    except json_format.ParseError as exc:
        raise InvalidJson(f"request does not match OTLP: {exc}") from exc
    except RecursionError as exc:
        raise InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels") from exc


def _rewrite_ids(node: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = _hex_to_b64(key, value)
            elif isinstance(value, dict | list):
                _rewrite_ids(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                _rewrite_ids(item, depth + 1)


def _hex_to_b64(key: str, value: str) -> str:
    if not value:
        return ""
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError) as exc:
        raise InvalidJson(f"{key} {value!r} is not hex") from exc
    return base64.b64encode(raw).decode()


def dump(message: Message) -> bytes:
    text: str = json_format.MessageToJson(message, preserving_proto_field_name=False, indent=None)
    return text.encode()
