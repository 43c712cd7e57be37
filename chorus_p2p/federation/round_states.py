"""Round states, in order. A round only moves forward.

A round is "proposed" once its result blobs exist and the coordinator is collecting
acknowledgements; it is "committed" when a majority of members hold the record."""

OPEN, COLLECTING, AGGREGATING = "open", "collecting", "aggregating"
PROPOSED, COMMITTED = "proposed", "committed"
