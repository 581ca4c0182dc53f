"""Helpers tests share that start real outside services (a throwaway Ceph)."""
