"""What is not current, as Dagster sees it: the STALE / MISSING flags the UI shows, with files gone from disk and
the downstream closure added; for inspection and tests (`python -c "..."` or a notebook) and the UI alike.

Dagster decides from what it recorded: every asset declares a `code_version` and every materialisation a data
version (the fingerprint of its inputs and config, or of the rows themselves), so a partition is STALE when its
code version changed or an input's data version moved since it was made, and MISSING when it never was. On top of
that, a partition whose output is gone from disk counts as missing, and everything downstream of a partition that
must run must run too (Dagster marks only the changed asset itself stale until it is rematerialised; its new data
version would then mark the rest). Config and resources are not in Dagster's model: an asset that runs checks its
own fingerprint (inputs + config + code version) and returns its stored output when nothing changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from assets import layout


class Todo(NamedTuple):
    """One (asset, partition) that must run, and why."""

    asset: str
    partition: str | None
    reason: str
    """`missing`, `stale: <Dagster's causes>`, `not on disk` or `upstream <asset>[<partition>] must run`."""


def _resolver(instance: dg.DagsterInstance, asset_graph) -> CachingStaleStatusResolver:
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)


def _partitions(asset_graph, key: dg.AssetKey, wanted: dict[str, Sequence[str | None]] | None) -> list[str | None]:
    name = key.to_user_string()
    if wanted is not None and name in wanted:
        return list(wanted[name])
    pdef = asset_graph.get(key).partitions_def
    return [None] if pdef is None else list(pdef.get_partition_keys())


def observe_sources(instance: dg.DagsterInstance, assets: Sequence, resources: dict) -> None:
    """Record a fresh observation of the observable sources (`pool_source`, `examples_source`: one data version
    per shard from the source's content), so that a changed input marks exactly its shards' ingest stale."""
    from dagster._core.definitions.observe import observe

    sources = [a for a in assets if getattr(a, "is_observable", False)]
    if sources and not observe(sources, instance=instance, resources=resources, raise_on_error=False).success:
        raise RuntimeError("observing the sources failed (see the log above): check MISP_SOURCE and its paths")


def stale_or_missing(instance: dg.DagsterInstance, assets: Sequence, selection: Iterable[str],
                     partitions: dict[str, Sequence[str | None]] | None = None,
                     root: Path | None = None, resources: dict | None = None) -> list[Todo]:
    """The (asset, partition) pairs of `selection` that must run, in dependency order.

    `assets`: the definitions (`assets.definitions.all_assets`); `partitions`: per asset name, the partitions that
    matter (default: all of the asset's); `root`: the data root, to count a partition whose output file or folder
    is gone as missing; `resources`: given, the sources are observed first (`observe_sources`). The UI shows the
    same STALE / MISSING flags (the upstream closure aside). Observable sources are never in the answer."""
    if resources is not None:
        observe_sources(instance, assets, resources)
    asset_graph = AssetGraph.from_assets(list(assets))
    resolver = _resolver(instance, asset_graph)
    names = list(dict.fromkeys(selection))
    keys = [dg.AssetKey(n) for n in names if not asset_graph.get(dg.AssetKey(n)).is_external]
    order = [k for k in asset_graph.toposorted_asset_keys if k in set(keys)]
    todo: dict[tuple[str, str | None], Todo] = {}
    for key in order:
        name = key.to_user_string()
        parents = [p for p in asset_graph.get(key).parent_keys if p in set(keys)]
        for pk in _partitions(asset_graph, key, partitions):
            reason = _own_reason(resolver, key, pk, root)
            if reason is None:
                reason = _upstream_reason(asset_graph, key, pk, parents, todo)
            if reason is not None:
                todo[(name, pk)] = Todo(name, pk, reason)
    return list(todo.values())


def _own_reason(resolver, key: dg.AssetKey, pk: str | None, root: Path | None) -> str | None:
    status = resolver.get_status(key, pk)
    if status == StaleStatus.MISSING:
        return "missing"
    if status == StaleStatus.STALE:
        causes = "; ".join(c.reason for c in resolver.get_stale_causes(key, pk))
        return f"stale: {causes}"
    if root is not None and not layout.on_disk(root, key.to_user_string(), pk):
        return "not on disk"
    return None


def _upstream_reason(asset_graph, key, pk, parents, todo) -> str | None:
    for parent in parents:
        parent_name = parent.to_user_string()
        running = [p for (n, p) in todo if n == parent_name]
        if not running:
            continue
        if pk is None or asset_graph.get(parent).partitions_def is None:
            return f"upstream {parent_name} must run"
        upstream = asset_graph.get_parent_partition_keys_for_child(
            partition_key=pk, parent_asset_key=parent, child_asset_key=key).partitions_subset.get_partition_keys()
        hit = next((p for p in running if p is None or p in set(upstream)), None)
        if hit is not None or any(p is None for p in running):
            return f"upstream {parent_name}[{hit}] must run"
    return None
