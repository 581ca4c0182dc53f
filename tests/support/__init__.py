"""Reusable test machinery: a vhost-user master in Python (vhost_master), a
real STML in-process with a gate opcode (gated_stml), the guest builder and
QEMU runner for guest tests (guest), a throwaway Ceph (ceph) and gateway
hosts in network namespaces (gateways)."""
