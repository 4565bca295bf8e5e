"""What a run leaves on disk: its checkpoint, its metrics, the private files under them.

* :mod:`fedtune.run.checkpoint`: save and load the signed checkpoint of a server or
  a node (the latest global sum and its round);
* :mod:`fedtune.run.manifest`: the checkpoint's ``state.json``, its checks and HMAC;
* :mod:`fedtune.run.files`: private files (mode 0600, no symlinks, atomic replace,
  capped reads) for the checkpoint and the client's release records;
* :mod:`fedtune.run.metrics`: the per-round ``metrics.jsonl`` records and their plot.

Importing the package imports none of them.
"""
