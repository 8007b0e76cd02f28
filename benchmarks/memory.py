"""How much memory one active operation takes in a replica's mirror.

A standalone replica contains `operations` running installs, each with a status as a
download reports it, two nodes, and an OpCache entry. tracemalloc counts the bytes
allocated for them, which are divided by the count.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from replistate import NodeProgress, NodeState, OpStatus, Replica, ReplicaConfig
from replistate.opcache import OpCacheEntry


def sample_status(index: int) -> OpStatus:
    """Return the status of install `index` halfway through its download."""
    nodes = tuple(
        NodeProgress(
            node_id=f"node-{node}",
            node_name=f"worker-{node}",
            status=NodeState.DOWNLOADING,
            percentage=float(index % 100),
            file_name=f"model-{index}.gguf",
            current="1.1 GB",
            total="2.3 GB",
        )
        for node in (1, 2)
    )
    return OpStatus(
        progress=float(index % 100),
        message=f"downloading model-{index}.gguf",
        file_name=f"model-{index}.gguf",
        file_size="2.3 GB",
        downloaded_size="1.1 GB",
        gallery_element_name=f"model-{index}",
        cancellable=True,
        nodes=nodes,
    )


async def measure(operations: int) -> float:
    """Return the bytes per active operation held in the mirror."""
    replica = Replica(ReplicaConfig(replica_id="bench-memory"))
    await replica.start()
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(operations):
            job_id = f"{index:08d}-0000-4000-8000-000000000000"
            replica.operations.restore(job_id, sample_status(index), 1)
            replica.opcache.restore(
                OpCacheEntry(f"gallery@model-{index}", job_id, False)
            )
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        if len(replica.operations.statuses()) != operations:
            raise RuntimeError("the mirror does not hold every operation")
        return (after - before) / operations
    finally:
        await replica.stop()


def run(operations: int) -> float:
    """Run `measure` in a new event loop."""
    return asyncio.run(measure(operations))
