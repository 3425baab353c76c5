"""LineInspect models package."""
