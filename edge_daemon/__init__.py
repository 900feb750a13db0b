"""edge_daemon"""
