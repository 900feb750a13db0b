"""fleet_protocol"""
