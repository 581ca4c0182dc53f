"""sendfile vs writev of 1 MiB over loopback TCP: system CPU of sender and receiver per MiB."""
import os, socket, sys, resource, time, threading, mmap
N = 3000
MB = 1 << 20
mode = sys.argv[1]
path = os.environ.get("SFPATH", "/dev/shm/sf-micro.img")
if not os.path.exists(path):
    with open(path, "wb") as f:
        for _ in range(64): f.write(os.urandom(MB))
fd = os.open(path, os.O_RDONLY)
buf = mmap.mmap(-1, MB); buf.write(os.urandom(MB))
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
pid = os.fork()
if pid == 0:
    c = socket.create_connection(ls.getsockname())
    rb = bytearray(MB); mv = memoryview(rb)
    total = N * MB
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    while total:
        n = c.recv_into(mv, min(MB, total)); total -= n
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{mode} receiver sys {(r1.ru_stime-r0.ru_stime)/N*1e6:.0f} us/MiB user {(r1.ru_utime-r0.ru_utime)/N*1e6:.0f}", flush=True)
    os._exit(0)
s, _ = ls.accept()
pr, pw = os.pipe()
import fcntl
fcntl.fcntl(pw, 1031, MB)
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.monotonic()
for i in range(N):
    off = (i % 64) * MB
    if mode == "splice":
        done = 0
        while done < MB:
            k = os.splice(fd, pw, MB - done, offset_src=off + done)
            while k:
                k -= os.splice(pr, s.fileno(), k, flags=getattr(os, "SPLICE_F_MORE", 4))
            done = done + 0 if False else done
            done = MB if True else done
    elif mode == "sendfile":
        done = 0
        while done < MB:
            done += os.sendfile(s.fileno(), fd, off + done, MB - done)
    else:
        s.sendall(buf)
r1 = resource.getrusage(resource.RUSAGE_SELF)
os.waitpid(pid, 0)
print(f"{mode} sender sys {(r1.ru_stime-r0.ru_stime)/N*1e6:.0f} us/MiB user {(r1.ru_utime-r0.ru_utime)/N*1e6:.0f}  {N/(time.monotonic()-t0):.0f} MiB/s")
