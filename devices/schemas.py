"""The JSON Schemas of protocol v1's message bodies (``hil/schemas/``), and checking a body.

The schemas are the protocol document's contract in machine-readable form. With
``TDW_VALIDATE_FRAMES=1`` in the environment (the test suite sets it), every link checks
every data frame it sends or receives against them, so the document, the host and the
controller simulator cannot drift apart unnoticed; ``tdw-emu hil check`` uses them to judge
a real controller.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources

from jsonschema import Draft202012Validator

from devices.protocol import MessageType

ENV_FLAG = "TDW_VALIDATE_FRAMES"


class SchemaViolation(ValueError):
    """A body that does not follow its message's schema."""


@functools.cache
def _validator(kind: MessageType) -> Draft202012Validator:
    text = resources.files("hil").joinpath("schemas", f"{kind.name}.json").read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(kind: MessageType, body: dict) -> list[str]:
    """Each way ``body`` breaks the schema of ``kind`` (empty when it follows it); judged
    as it is on the wire, after JSON encoding (a tuple is an array there)."""
    body = json.loads(json.dumps(body))
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or 'body'}: {error.message}"
        for error in _validator(kind).iter_errors(body)
    ]


def check(kind: MessageType, body: dict) -> None:
    found = problems(kind, body)
    if found:
        raise SchemaViolation(f"{kind.name} body: {'; '.join(found)[:300]}")


def validation_enabled() -> bool:
    return os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")
