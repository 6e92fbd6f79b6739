"""Edge agents: a site's own planner and workers on a signed bundle from the centre."""
