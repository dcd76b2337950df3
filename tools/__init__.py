"""dpipes.tools."""
