"""Sensors beside the microphone: the calibrated sound level (LAeq) and sysfs sensors.

``laeq`` computes the A-weighted level of each second of audio; ``sysfs`` reads IIO and
hwmon attributes; ``sampler`` samples them on a schedule and hands ``Telemetry``
(``fleet_protocol.telemetry``) to the MQTT link and to ``store`` (the ``telemetry``
table beside the replay buffer); ``resend`` re-publishes what a broker outage held back
once the link is up again. Only numbers leave this package, never audio.
"""
