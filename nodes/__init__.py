"""dpipes.nodes."""
