"""One partition per shard: every per-shard asset resumes shard by shard and shards run in parallel."""

import dagster as dg

from pipeline.sharding import shard_keys

shard_partitions = dg.StaticPartitionsDefinition(shard_keys())


def shard_index(context: dg.AssetExecutionContext) -> tuple[int, int]:
    """(this shard, number of shards) of the running partition."""
    keys = shard_partitions.get_partition_keys()
    return keys.index(context.partition_key), len(keys)
