"""Four published versions of the example fleet schema, for the schema-evolution tests:
v2 adds a field (`tasks.floor`), v3 renames one (`tasks.notes` -> `note`), v4 changes
types (`tasks.eta` int -> string, `inventory.bin` string -> int)."""

from __future__ import annotations

from schemas.collection import example_catalog_path

V1 = example_catalog_path().read_text()
# v2: a new optional field
V2 = V1.replace("version = 1", "version = 2").replace(
    'proof = { type = "json"', 'floor = { type = "int" }\nproof = { type = "json"')
# v3: `notes` renamed `note`
V3 = ('version = 3\n[[migrations]]\nop = "rename"\ncollection = "tasks"\nfrom = "notes"\n'
      'to = "note"\n' + V2.replace("version = 2", "").replace(
          "notes = { type", "note = { type"))
# v4: `eta` int -> string; inventory `bin` string -> int
V4 = ('version = 4\n[[migrations]]\nop = "convert"\ncollection = "tasks"\nfield = "eta"\n'
      '[[migrations]]\nop = "convert"\ncollection = "inventory"\nfield = "bin"\n'
      + V3.split("\n", 6)[6].replace('eta = { type = "int"', 'eta = { type = "string"')
      .replace('bin = { type = "string", max_length = 32 }', 'bin = { type = "int" }'))
