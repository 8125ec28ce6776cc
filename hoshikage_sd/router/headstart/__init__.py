"""The head start: the request that woke the router, its model's unit started before the
router's own imports.

From zero processes, systemd starts the router for the connection waiting on
hoshikage.socket. Before the router can read requests, its imports take a while; the head
start uses that time. One module per step, in the order a cold request meets them:

- take: the two steps, take_early() (first thing in `hoshikage router`) and take() (once
  the manifest is parsed), and FirstRequest, what they hand the router;
- request: the waiting connection, its request peeked at, the model names it asks for;
- index: what the last router kept of the manifest for this (its name table, each model's
  unit and ticket), and the lookup by the manifest's own rule (naming.matches);
- admit: the policy's decision for the one case judged here, no other model up, and the
  launch ticket the router would leave.

The unit starts through sd/units.start_unit, the sockets come from sd/daemon.listen_fds, the
request head is split by router/http1.py: the house's own, imported with built-in modules
only (the head start's budget, tests/unit/test_launch.py).
"""
