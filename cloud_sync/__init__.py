"""LineInspect cloud_sync package."""
