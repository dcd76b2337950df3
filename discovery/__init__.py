"""dpipes.discovery."""
