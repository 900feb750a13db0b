"""The device's uplink: the outbox that seals, sends and resends upload batches."""

from edge_daemon.uplink.outbox import Outbox, OutboxStats, Signer

__all__ = ["Outbox", "OutboxStats", "Signer"]
