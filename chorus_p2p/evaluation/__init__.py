"""``chorus-node eval``: does federating help, against the bounds that matter (local-only and
centralized), over seeds, through the same training and aggregation code the node runs."""
