"""iSCSI front end: sans-IO protocol core (PDU codec, negotiation, login, CHAP)."""
