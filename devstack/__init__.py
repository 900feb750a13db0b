"""devstack: starts the real local components of the embedded default.

Mosquitto with mTLS, one swtpm per simulated device, a SoftHSM2 token, and the
simulated devices themselves, on free loopback ports, for the demo and the
integration tests. Everything it starts it stops by PID (see ``procs``).
"""
