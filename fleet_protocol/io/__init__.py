"""I/O adapters both services share: the MQTT link, durable file writes and config files.

The sans-IO core (every other ``fleet_protocol`` module) never imports this package;
``tests/unit/test_sans_io.py`` guards that.
"""
