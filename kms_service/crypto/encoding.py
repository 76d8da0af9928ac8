"""The injective encoding `enc(p1, p2, ...)` of DESIGN §2 (normative)."""

from __future__ import annotations

MAX_PART_BYTES = 0xFFFF


def enc(*parts: str | int) -> bytes:
    """Encode parts as length-prefixed UTF-8 strings.

    Each part (an ``int`` is written as decimal ASCII) is preceded by its length as a 2-byte
    big-endian integer. The result is injective: distinct part tuples never collide.

    Raises ``ValueError`` for a part longer than 65535 bytes and ``TypeError`` for a part that is
    neither ``str`` nor ``int`` (``bool`` included, which would otherwise pass as an ``int``).
    """
    out = bytearray()
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise TypeError(f"enc() parts must be str or int, not {type(part).__name__}")
        data = (str(part) if isinstance(part, int) else part).encode("utf-8")
        if len(data) > MAX_PART_BYTES:
            raise ValueError("enc() part longer than 65535 bytes")
        out += len(data).to_bytes(2, "big")
        out += data
    return bytes(out)
