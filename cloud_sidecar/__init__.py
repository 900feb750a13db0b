"""cloud_sidecar"""
