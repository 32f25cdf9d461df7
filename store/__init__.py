"""The bottom layer: how artifacts are written, read, fingerprinted and located, and which files may be opened.

Everything else (pipeline/, sae/, trainer/, world/, eval/, assets/, experiment/) builds on it; it imports none of
them. Modules: `parquet_io` (atomic Parquet/JSON writes with provenance metadata), `fingerprint` (content keys),
`paths` (the data root and per-shard file names), `safe_files` (regular files inside a root, size-limited),
`image_policy` (what an image may be), `safe_image` (the one opener every reader after ingest uses).
"""

SCHEMA_VERSION = 1
"""Version of the tables' layout; written into every Parquet file's metadata and the world's world.json."""
