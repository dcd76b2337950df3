"""dpipes.bus."""
