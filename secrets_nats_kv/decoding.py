"""Our own words for why bytes did not decode as a type.

msgspec's error texts are its own and change between releases (0.23 reworded invalid
UTF-8), so no message we send to a host, print to an operator or assert in a test may
carry them. A decode that fails is rare and may be slow: `why_undecodable` re-reads the
bytes generically and names the first thing wrong, in words this project owns.
"""

from __future__ import annotations

import msgspec

# Everything msgspec's JSON decoding can raise on hostile input: malformed or mistyped
# JSON (DecodeError and its subclass ValidationError), nesting deeper than the
# interpreter's recursion limit (RecursionError, even inside a field it only skips), and
# bad UTF-8 (UnicodeDecodeError before 0.23, DecodeError since).
DECODE_FAILURES = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)

_any = msgspec.json.Decoder()


def why_undecodable(data: bytes | str, target: object) -> str:
    """Why `data` is not a JSON `target` (a Struct class or any msgspec type), in our words."""
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8"
    try:
        raw = _any.decode(data)
    except RecursionError:
        return "nested too deeply"
    except msgspec.DecodeError:
        return "not JSON"
    if isinstance(target, type) and issubclass(target, msgspec.Struct):
        return _why_not_struct(raw, target)
    try:
        msgspec.convert(raw, target)
    except RecursionError:
        return "nested too deeply"
    except msgspec.ValidationError:
        return "not of the expected shape"
    return "not of the expected shape"


def _why_not_struct(raw: object, target: type[msgspec.Struct]) -> str:
    if not isinstance(raw, dict):
        return "not a JSON object"
    for field in msgspec.structs.fields(target):
        if field.encode_name not in raw:
            if field.required:
                return f"`{field.encode_name}` is missing"
            continue
        try:
            msgspec.convert(raw[field.encode_name], field.type)
        except RecursionError:
            return f"`{field.encode_name}` is nested too deeply"
        except msgspec.ValidationError:
            return f"`{field.encode_name}` has the wrong type or value"
    return "its fields do not fit together"
