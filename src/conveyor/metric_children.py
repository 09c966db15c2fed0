"""LabelledChildren: a Prometheus metric's labelled children, each looked up once.

A leaf shared by the server's metrics (`monitoring/metrics.py`) and the worker's
(`worker/metrics.py`), which record several labelled series per task: `labels()` checks
its values, joins them and takes a lock on every call, a few microseconds each time.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client.metrics import MetricWrapperBase

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)


class LabelledChildren(Generic[_Metric]):
    """A labelled metric's children, each looked up through `labels()` once.

    `labels()` checks, joins and locks on every call: a few microseconds, several times per
    task on the hot paths of servers and workers. Callers bound the label values (as
    `ServerMetrics.type_label` does); a race between threads builds a child twice, and
    `labels()` returns the same child either way.
    """

    def __init__(self, metric: _Metric) -> None:
        """Children of `metric`, made on first use."""
        self._metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        """The child for these label values."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child
