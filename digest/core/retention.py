"""How far back the rules that read the ledger look: what compaction must leave in place.

A ground module (it imports nothing of the domain) so that settings can check a retention
window against it without loading the delivery code.
"""

from __future__ import annotations

import datetime as dt

# Candidates of a weekly digest span 7 days; a paper can only repeat within that reach.
NO_REPEAT_LOOKBACK = dt.timedelta(days=15)
