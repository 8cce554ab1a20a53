"""Ophyd devices for std-daq."""
