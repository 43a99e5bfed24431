"""The OTLP/JSON encoding → protobuf messages.

OTLP/JSON is proto3 JSON with two differences that `json_format` does not
know: trace and span ids are hex (not base64), and receivers must ignore
unknown fields. Ids are rewritten to base64 before parsing.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


class InvalidJson(ValueError):
    pass


def parse(body: bytes, message_type: type[M]) -> M:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidJson("request body must be a JSON object")
    _rewrite_ids(document)
    try:
        parsed: M = json_format.ParseDict(document, message_type(), ignore_unknown_fields=True)
        return parsed
    except json_format.ParseError as exc:
        raise InvalidJson(f"request does not match OTLP: {exc}") from exc


def _rewrite_ids(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = _hex_to_b64(key, value)
            else:
                _rewrite_ids(value)
    elif isinstance(node, list):
        for item in node:
            _rewrite_ids(item)


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
