"""A scheduler plugin for test_scale_out.py: what reached Dask's scheduler, graph by graph.

Imported only where the ``dask`` extra is installed. The scheduler of a ``LocalCluster`` runs in
the test's process, which imports this module by name.
"""

from distributed.diagnostics.plugin import SchedulerPlugin


class GraphLog(SchedulerPlugin):
    """Records the keys of every graph a client sends (one ``client.submit`` or ``client.map``
    call each)."""

    name = "threadflow-test-graph-log"

    def __init__(self):
        self.graphs = []

    def update_graph(self, scheduler, *, keys, **kwargs):
        self.graphs.append(sorted(str(key) for key in keys))


def graphs_seen(dask_scheduler):
    """The graphs the plugin recorded, in the order they came (run with ``run_on_scheduler``)."""
    return dask_scheduler.plugins[GraphLog.name].graphs
