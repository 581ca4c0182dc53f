"""Process plumbing shared by the STML and every front end (not the contract:
that is stml.api): logging now; a leaf package that imports only the standard
library, so any layer may use it."""
