"""Publishes to a channel and reads it back: python example.py [unix:/path | tcp:host:port] [key]"""

import sys

from kometa_admin import KometaAdmin, KometaError

address = sys.argv[1] if len(sys.argv) > 1 else None  # default: $KOMETA_ADMIN, else the server's default socket
admin = KometaAdmin(address, key=sys.argv[2] if len(sys.argv) > 2 else None)

print(admin.publish("news", "update", {"title": "Hello from Python"}))
print(admin.channel_info("news"))

with admin.pipeline() as p:
    for n in range(3):
        p.publish("news", "tick", {"n": n})
    p.publish("not a channel!", "tick", 0)
    for result in p.execute():
        print(result)  # a dict, or a KometaError for the bad channel

try:
    admin.presence("news")  # the default namespace keeps no presence
except KometaError as error:
    print("refused:", error.code, error.name, error.message)
