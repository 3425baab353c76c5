"""LineInspect edge runtime: capture, inference, pipeline, result store, web panel."""

__version__ = "0.1.0"
