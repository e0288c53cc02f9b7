"""Delivering a digest exactly once per subscriber: plan, claim, send, record.

The parts, each in its own module:

* ``ledger``: the ``deliveries`` table, and the only module that reads or writes it — writing
  planned rows, claiming them, recording them as sent, failed or skipped, keeping leases
  alive, expiring stale rows, and every look-up others need (what is open, counts, a person's
  rows), answered with plain values (``Entry``) rather than rows;
* ``planning``: each subscriber's papers chosen for a page of an edition (no repeats within
  ``NO_REPEAT_LOOKBACK``), written to the ledger;
* ``composer``: an edition's candidates, the ranker that picks from them (built only when a
  page is planned) and each subscriber's rendered message with its fixed ``Message-ID``;
* ``batch``: the batch sender — claim, render and send one page over one SMTP pool; it
  chooses no papers, so a worker that only sends never ranks;
* ``policy``: ``DeliveryPolicy`` and what a failed attempt leads to (retry after backoff, fail,
  bounce). What a bounce does to the subscriber is ``digest.subscribers.subscriptions``' to decide;
* ``compaction``: old editions' rows reduced to what the rules still read, the edition closed;
* ``reputation``: the complaint rate and the self-imposed sending pause above a threshold.

The ledger is the ``deliveries`` table. A delivery is

* planned (``pending``, its papers chosen) by a planner, one keyset page of subscribers at a time;
* claimed (``sending`` with a lease) in its own committed transaction *before* its message
  goes out, so a second worker, a retry or a rerun leaves it alone;
* marked ``sent`` (with the server's reply) in a transaction right after the server accepts it,
  or put back to ``pending`` with a backoff for temporary failures, or ``failed`` for
  permanent ones and after the last attempt.

A worker killed between the server's acceptance and the ``sent`` commit leaves a ``sending``
row whose lease expires; the next claim sends the same message again with the same
``Message-ID`` (receivers de-duplicate on it). That window of one in-flight message per SMTP
connection is the only way a message can arrive twice.

The ledger is at the bottom: it imports only ``policy`` of this package, and the layers
contract in ``pyproject.toml`` keeps it there (``planning``, ``batch``, ``compaction`` over
``composer`` over ``ledger`` over ``policy``).

Import from the submodules (``from digest.delivery.ledger import claim``): this package
re-exports nothing, so where a name is imported from says which part it belongs to.
"""
