"""Detector control: one interface (base), slsdet implementation (sls), virtual-server helpers."""
