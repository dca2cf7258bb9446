"""The work-aware request router of ``earlyexit serve --replicas`` (Ray Serve's
``RequestRouter`` API; imported by Ray, by its path, only where Ray Serve is installed).

Each replica reports the layer steps its engine still owes (``record_routing_stats``:
``LLMEngine.queued_layer_steps``), polled by Ray Serve's controller every
``request_routing_stats_period_s``. A request goes to the replica that owes the fewest.
Between two reports the router adds, per replica, what it has chosen it for since the
last one (the request's ``max_tokens`` at full depth, the front's ``cost``), so a burst of
requests does not all land on the replica that was least loaded at the last report.
Ray Serve's default router instead picks the shorter queue of two random replicas,
counting requests: a ``full`` request and a ``free`` one that exits after a quarter of the
layers count the same there.
"""

from __future__ import annotations

from ray.serve.request_router import RequestRouter


class WorkAwareRouter(RequestRouter):
    """Least layer steps owed first (see the module docstring)."""

    def initialize_state(self, **kwargs) -> None:
        # replica id -> (the report it was last seen with, work sent since that report)
        self._sent: dict = {}

    def _sent_since_report(self, replica) -> float:
        """Work sent to ``replica`` since its last report (reset when a new one arrives)."""
        report = (replica.routing_stats or {}).get("report")
        seen, sent = self._sent.get(replica.replica_id, (None, 0.0))
        if seen != report:
            sent = 0.0
            self._sent[replica.replica_id] = (report, sent)
        return sent

    def _load(self, replica) -> float:
        stats = replica.routing_stats or {}
        return stats.get("queued_layer_steps", 0) + self._sent_since_report(replica)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        """Every candidate, least loaded first (one rank each: Ray tries them in order
        when one is at its ``max_ongoing_requests``). The request's estimated work is
        counted on the first at once: Ray chooses for a burst of requests before any of
        them has reached its replica, and they must not all go to the same one."""
        try:
            ranked = sorted(candidate_replicas, key=self._load)
        except Exception:  # malformed stats: Ray's choice among all, never a stuck request
            return [list(candidate_replicas)]
        if ranked and pending_request is not None:
            best = ranked[0]
            cost = pending_request.kwargs.get("cost", 0) or 0
            n_steps = (best.routing_stats or {}).get("n_steps", 1) or 1
            sent = self._sent_since_report(best)
            report = (best.routing_stats or {}).get("report")
            self._sent[best.replica_id] = (report, sent + cost * n_steps)
        return [[r] for r in ranked]
