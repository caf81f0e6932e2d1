"""JSON Schemas the structured-output tests use, and a validator (jsonschema_rs, which schemathesis
brings with the test extras)."""
import pytest

# Bounded strings and numbers: a random-weight model must finish the value within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "member"],
    "additionalProperties": False,
}


def assert_valid(schema: dict, value) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(value)]
    assert not errors, (value, errors)

# A tool's parameters (the tool-call tests): small bounds, so a call's JSON is short.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
