"""The technician web panel."""
