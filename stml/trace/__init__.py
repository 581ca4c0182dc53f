"""Traces of the contract (issue 22): record every message on the link
(recorder, a tap on the STML), read them (format), feed the front ends'
messages to a fresh STML and compare its answers (replay), and turn them
into per-command rows and latency percentiles (report).
docs/research.md, "Trace and replay", describes them for users."""
