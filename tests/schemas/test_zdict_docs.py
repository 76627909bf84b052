"""PROTOCOL.md §3's rules for the zd2 dictionary, as written, give the server's bytes.

tests/e2e/protocol_zd.py derives the dictionary from the text alone (standard library,
the zd1 dictionary from `schemas/zd1.dict`); `schemas.zdict_schema` is the reference the
server and the agent use. They must agree on every schema shape the text covers - every
type and strategy, groups left out, collections and fields in file order (dotted tables
too), and the 24 KiB cut the e2e tests never reach - and the figures the text gives for
the example schema must be true."""

from __future__ import annotations

import re
import tomllib
import zlib
from pathlib import Path

import pytest

from schemas import zdict, zdict_schema
from schemas.collection import example_catalog_path, parse_catalog
from tests.e2e.protocol_zd import schema_dictionary

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

EVERY_KIND = """version = 1
[collections.zeta]
scope = "fleet"
[collections.zeta.fields]
b = { type = "bool" }
cnt = { type = "float", merge = "counter" }
s1 = { type = "set", merge = "set" }
j = { type = "json", description = "free-form" }
m = { type = "int", merge = "manual" }
st = { type = "string", merge = "manual", max_length = 3 }
fl = { type = "float", min = 0 }
c2 = { type = "int", merge = "counter" }
s2 = { type = "set" }
[collections.alpha]
scope = "fleet"
[collections.alpha.fields]
x = { type = "int", merge = "counter" }
[collections.beta]
scope = "fleet"
[collections.beta.fields]
y = { type = "set" }
"""

DOTTED = """version = 1
[collections.b.fields.y]
type = "string"
[collections.a]
scope = "fleet"
[collections.a.fields]
z = { type = "int" }
[collections.b]
scope = "fleet"
[collections.b.fields.x]
type = "int"
"""


def _big() -> str:
    """A schema whose part is over 24 KiB (40 collections of 30 long field names)."""
    lines = ["version = 1"]
    for c in range(40):
        name = f"collection_{c:03d}_of_a_large_fleet"
        lines += [f"[collections.{name}]", 'scope = "fleet"', f"[collections.{name}.fields]"]
        lines += [f'field_number_{k:03d}_with_a_long_name = {{ type = "string" }}'
                  for k in range(30)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [example_catalog_path().read_text(), EVERY_KIND, DOTTED,
                                  _big()], ids=["fleet", "every-kind", "dotted", "big"])
def test_the_text_derives_the_reference_dictionary(text: str) -> None:
    reference = zdict_schema.dictionary(parse_catalog(tomllib.loads(text)))
    assert schema_dictionary(text) == reference


def test_the_cut_is_the_first_24_kib_of_the_schema_part() -> None:
    derived = schema_dictionary(_big())
    assert derived[:len(zdict.DICTIONARY)] == zdict.DICTIONARY
    assert len(derived) - len(zdict.DICTIONARY) == 24 * 1024
    assert derived[len(zdict.DICTIONARY):].startswith(b'"c":"collection_000_of_a_large')


def test_the_example_figures_in_the_text_are_true() -> None:
    """§3 states the example schema's part length, its start and its DICTID, so an
    implementer can check a derivation without running Python."""
    text = PROTOCOL.read_text()
    derived = zdict_schema.dictionary(parse_catalog(tomllib.loads(
        example_catalog_path().read_text())))
    part = derived[len(zdict.DICTIONARY):]
    stated = re.search(r"the\s+schema part is ([\d,]+) bytes, starting\s+`([^`]+)`\s+and the "
                       r"DICTID is `(0x[0-9a-f]{8})`", text)
    assert stated is not None, "PROTOCOL.md §3 no longer states the example's figures"
    assert int(stated[1].replace(",", "")) == len(part)
    assert part.startswith(stated[2].encode())
    assert int(stated[3], 16) == zlib.adler32(derived)


def test_field_order_matters() -> None:
    """Two copies listing the same fields in another order are two dictionaries (§3)."""
    swapped = EVERY_KIND.replace('b = { type = "bool" }\ncnt', 'cnt').replace(
        's2 = { type = "set" }', 's2 = { type = "set" }\nb = { type = "bool" }')
    assert sorted(swapped.splitlines()) == sorted(EVERY_KIND.splitlines())
    assert schema_dictionary(swapped) != schema_dictionary(EVERY_KIND)
