"""The JSON Schema of ``manifest.json`` (format 2): a bundle is untrusted input, so its structure
is checked before any field is used (``jsonschema``), and every path field is a plain relative
string that ``bundle.resolve_inside`` then confines to the bundle folder."""

from __future__ import annotations

from typing import Any

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# a relative POSIX path: no leading '/', no backslash, no drive, no empty / '.' / '..' component
RELPATH = {
    "type": "string", "minLength": 1, "maxLength": 1024,
    "pattern": r"^(?!/)(?!.*\\)(?!.*//)(?!(.*/)?\.\.?(/|$))[^\x00:]+$",
}
TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "dtype": {"type": "string", "minLength": 1},
    },
}
ARTIFACT = {
    "type": "object",
    "required": ["stage", "target", "files", "sha256", "contract"],
    "properties": {
        "stage": {"type": "string", "minLength": 1},
        "target": {"type": "string", "minLength": 1},
        "files": {"type": "array", "minItems": 1, "items": RELPATH, "uniqueItems": True},
        "sha256": {"type": "object", "propertyNames": RELPATH, "additionalProperties": SHA256},
        "contract": {
            "type": "object",
            "properties": {
                "inputs": {"type": "array", "items": TENSOR},
                "outputs": {"type": "array", "items": TENSOR},
                "state_pairs": {"type": "array", "items": {
                    "type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}},
            },
        },
        "quant": {"type": "object"},
        "metadata": {"type": "object"},
    },
}
CHECKPOINT = {
    "type": "object",
    "required": ["source", "name", "sha256"],
    "properties": {
        "source": {"enum": ["bundled", "user", "seeded"]},
        "name": {"type": ["string", "null"]},
        "sha256": {"anyOf": [SHA256, {"type": "null"}]},
    },
    "additionalProperties": False,
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "s2dit-deploy bundle manifest",
    "type": "object",
    "required": ["format_version", "target", "model", "artifacts", "files"],
    "properties": {
        "format_version": {"const": 2},
        "target": {"type": "string", "minLength": 1},
        "model": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "config": {"type": "object"}, "checkpoint": CHECKPOINT},
        },
        "info": {"type": "object"},
        "artifacts": {"type": "object", "additionalProperties": ARTIFACT},
        "files": {"type": "object", "propertyNames": RELPATH, "additionalProperties": SHA256},
    },
}
