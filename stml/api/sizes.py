"""The size thresholds of the carriers, in one place: where data stops being
copied and starts being lent or received in place. docs/decisions/0008 and
0007 say why each is where it is."""
from __future__ import annotations

# Read data of at least this many bytes goes into the STML's shared region for a
# same-host front end (backend -> shared memory -> its socket); smaller data costs
# less to copy through the stream than to lend and hand back.
SHARED_READ_MIN = 32 << 10

# A frame of at least this many bytes is received into a buffer of its own
# (stream carrier, fetd_tcp's data segments) and sent without a copy (ZeroMQ);
# it is also the smallest slot of a shared region, so write segments of this
# size and more are what a front end lends the STML.
BIG_FRAME = 64 << 10

# Room for a header beside the largest frame a peer may send the STML, which is
# one command's data: at most the STML's max_transfer (a command asking for more
# is refused). Past max_transfer + FRAME_ROOM, ZeroMQ disconnects the peer before
# the frame is buffered (MAXMSGSIZE, stml.server); a header is far smaller.
FRAME_ROOM = 1 << 20

# Frames in one message, on either carrier: a stream message (its count field)
# and a ZeroMQ message, a batch with its header included (the ZeroMQ carrier
# splits its batches to fit). MAXMSGSIZE bounds a ZeroMQ frame, not how many
# come in one message: past this a message is dropped as it is received (0226).
MAX_FRAMES = 4096
