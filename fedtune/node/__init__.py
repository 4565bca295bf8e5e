"""A node's own side of a federation.

* :mod:`fedtune.node.round` -- one round's work on a node: a server message's content in,
  the reply's content out (imports torch; simulated clients and node workers run it).
* :mod:`fedtune.node.channel` -- the node-local gRPC channel from the thin ClientApp to
  the node's worker (imports no torch).
* :mod:`fedtune.node.worker` -- the long-lived worker process that holds the model, the
  data, the CKKS secret context and the ledger, started by ``fedtune deploy supernode``.
* :mod:`fedtune.node.ceremony` -- a deployed node's side of the ``ckks-multiparty`` key
  ceremony before round 1 (its own key and party file in its state directory).
"""
