"""Frame sources and the capture loop.

Import from the modules (this package stays import-light, since the config
root imports :mod:`edge.capture.config`):

- :mod:`edge.capture.loop`: :class:`~edge.capture.loop.CaptureLoop` (start/stop,
  ``latest`` for free-run, ``trigger``/``submit`` for triggered mode,
  ``stats``) and the :class:`~edge.capture.loop.CaptureError` family;
- :mod:`edge.capture.sources`: :class:`~edge.capture.sources.FrameSource`,
  :func:`~edge.capture.sources.open_source` and the source exceptions;
- :mod:`edge.capture.synth`: the synthetic line (``render_part``,
  ``write_dataset``, ``DEFECT_TYPES``).
"""
