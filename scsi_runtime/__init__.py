"""Process plumbing shared by the STML and every front end (not the contract:
that is stml.api): logging, the event loop, CURVE key files, portal
addresses. A leaf package: it imports nothing of this project, so any layer
may use it."""
