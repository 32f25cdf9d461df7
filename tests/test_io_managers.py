"""The IO managers' writing rules, without Dagster around them: a table is written quarantine first and not
rewritten when its provenance is unchanged (read back or NaN included), but is when only its content moved; a model
folder is saved whole under its final name, stamped, and swapped in place of the old one."""

import os

import polars as pl
import pytest

from assets.io_managers import FINGERPRINT_FILE, StagedFolder, Table, folder_fingerprint, read_table, save_folder, \
    staging_dir, write_table
from store.parquet_io import read_metadata


def test_a_table_is_rewritten_only_when_its_provenance_moves(tmp_path):
    rows, quarantine = tmp_path / "shard=000.parquet", tmp_path / "q" / "pool-shard=000.parquet"
    table = Table(pl.DataFrame({"id": ["a", "b"]}), pl.DataFrame({"id": ["c"], "reason": ["x"]}),
                  {"fingerprint": "f1", "content": "c1", "diversity": {"greedy": float("nan")}})
    assert write_table(table, rows, quarantine)
    assert read_metadata(rows)["fingerprint"] == "f1" and pl.read_parquet(quarantine)["id"].to_list() == ["c"]
    stamps = (os.stat(rows).st_mtime_ns, os.stat(quarantine).st_mtime_ns)
    assert not write_table(table, rows, quarantine)
    assert not write_table(read_table(rows, quarantine), rows, quarantine)  # read back: schema_version and all
    assert (os.stat(rows).st_mtime_ns, os.stat(quarantine).st_mtime_ns) == stamps
    # same inputs fingerprint, new rows (an image file changed under an unchanged manifest): written
    moved = Table(pl.DataFrame({"id": ["a"]}), table.quarantine, {**table.provenance, "content": "c2"})
    assert write_table(moved, rows, quarantine)
    assert pl.read_parquet(rows)["id"].to_list() == ["a"]
    with pytest.raises(ValueError, match="fingerprint"):
        write_table(Table(table.rows), rows, None)


def test_a_model_folder_is_swapped_in_whole_and_stamped(tmp_path):
    target = tmp_path / "models" / "sae"
    staged = staging_dir(target)
    (staged / "sae.safetensors").write_bytes(b"one")
    assert save_folder(StagedFolder("fp1", staged), target)
    assert (target / "sae.safetensors").read_bytes() == b"one" and folder_fingerprint(target) == "fp1"
    assert not save_folder(StagedFolder("fp1"), target)  # current: nothing staged, nothing written
    staged = staging_dir(target)
    (staged / "sae.safetensors").write_bytes(b"two")
    assert save_folder(StagedFolder("fp2", staged), target)
    assert (target / "sae.safetensors").read_bytes() == b"two" and (target / FINGERPRINT_FILE).read_text() == "fp2\n"
    assert [p.name for p in target.parent.iterdir()] == ["sae"]  # no staging or old folder left beside it
    with pytest.raises(ValueError, match="nothing staged"):
        save_folder(StagedFolder("fp3"), target)
