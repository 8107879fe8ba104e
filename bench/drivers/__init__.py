"""Drivers: one per system under test, all behind :class:`bench.drivers.base.Driver`."""
