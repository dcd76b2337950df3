"""Example dpipes plugins, one per module; each is tested with the harness in dpipes' tests/nodes/plugins/."""
