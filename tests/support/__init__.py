"""What the tests share (docs/testing.md, "Writing tests"): processes and how
to stop them (procs), the project's own processes (target), clients that send
what they are told (rawiscsi, rawfe), the management CLI (cli), an in-process
STML (sbc_harness), fault writers (faults), fuzz strategies (fuzzgen), peers
of other versions or behaviours (fakestml, gated_stml, vhost_master), guests,
Ceph and gateway hosts (guest, ceph, gateways), waiting in an event loop
(aio), and the suite's rules (ci, kinds). Nothing here is a test; no test module imports another."""
