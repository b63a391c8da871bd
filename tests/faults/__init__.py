"""The fault suite (issue 10): the real stack as separate processes, one fault per scenario, mid-batch.

``make faults`` runs the nine scenarios; ``make test`` collects the short form (scenarios 2, 3 and 6
on small batches). See ``stack.py`` for the processes, ``invariants.py`` for what is checked after
every scenario, ``runner.py`` for what is measured and how every wait is bounded.

S3 outages go through a TCP proxy (``services.TcpProxy``) between the stack and moto instead of
stopping moto: moto keeps buckets and objects in memory, so a restarted moto would come back
without the bucket or any image, which is a data-loss scenario of its own rather than an outage.
The proxy refuses new connections and cuts open ones for the outage, then listens again on the
same port; the invariant checker reads moto directly, never through the proxy.
"""
