"""Drives every operation of kometa_admin.py against a running server and
prints one JSON document with the results (tests/admin_clients.rs checks it).

    python scenario.py unix ADDRESS        # the full scenario
    python scenario.py tcp ADDRESS KEY     # a TCP listener with a key
    python scenario.py framing ADDRESS     # against the test's fake server
"""

import json
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kometa_admin import KometaAdmin, KometaError, KometaProtocolError  # noqa: E402


def error_doc(error):
    return {"error": {"code": error.code, "name": error.name, "message": error.message}}


def outcome(result):
    return error_doc(result) if isinstance(result, KometaError) else result


def scenario(address):
    admin = KometaAdmin(address, timeout=10)
    out = {"ping": admin.ping()}
    out["publish"] = admin.publish(
        "news", "greeting", {"from": "python", "text": "h\u00e9llo \"quoted\"\nline", "n": [1, 2.5, None, True]})
    out["raw"] = admin.publish("news", "raw", raw_json=b'{"raw":\n true}')
    out["stats"] = admin.stats()
    out["stats_node"] = admin.stats(node_only=True)
    out["send_user"] = admin.send_user(["alice", "nobody"], "notice", {"text": "hi"})
    out["presence"] = admin.presence("track_room")
    out["presence_page"] = admin.presence("track_room", cursor="", limit=1)
    out["presence_stats"] = admin.presence_stats("track_room")
    out["user_status"] = admin.user_status(["alice", "nobody"])
    out["channel_info"] = admin.channel_info("news")
    out["channel_info_missing"] = admin.channel_info("nowhere")
    out["channels"] = admin.channels()
    out["channels_page"] = admin.channels(prefix="", cursor="", limit=1)
    out["channels_next"] = admin.channels(cursor=out["channels_page"]["next"], limit=1)
    out["history"] = admin.history("news")
    out["history_since"] = admin.history("news", since=1, limit=10)
    with admin.pipeline() as p:
        for n in range(100):
            p.publish("batch", "n", {"n": n})
        batch = p.execute()
    out["batch"] = [outcome(r) for r in batch]
    with admin.pipeline() as p:
        p.publish("batch", "n", 100).publish("bad channel!", "n", 1).ping().presence("news")
        out["mixed"] = [outcome(r) for r in p.execute()]
    try:
        admin.publish("bad channel!", "e", 1)
        out["error"] = None
    except KometaError as error:
        out["error"] = error_doc(error)
    out["after_error"] = admin.ping()
    # Data over the server's limit: too_large, the connection stays open.
    try:
        admin.publish("news", "big", "x" * 300000)
        out["too_large"] = None
    except KometaError as error:
        out["too_large"] = error_doc(error)
    # A frame over admin_frame_bytes_max: bad_frame, the server closes the
    # connection and the next call reconnects.
    try:
        admin.publish("news", "huge", "x" * 1500000)
        out["bad_frame"] = None
    except KometaError as error:
        out["bad_frame"] = error_doc(error)
    out["after_bad_frame"] = admin.ping()
    out["disconnect"] = admin.disconnect("alice", code=4000, reason="bye")
    out["publish_many"] = admin.publish_many(["many_a", "many_b"], "many", {"n": 1})
    out["reload"] = admin.reload()
    admin.close()
    return out


def tcp(address, key):
    out = {}
    try:
        KometaAdmin(address, key="wrong-key-wrong-key-wrong", timeout=10)
        out["wrong_key"] = None
    except KometaError as error:
        out["wrong_key"] = error_doc(error)
    try:
        KometaAdmin(address, timeout=10).ping()
        out["no_key"] = None
    except KometaError as error:
        out["no_key"] = error_doc(error)
    admin = KometaAdmin(address, key=key, timeout=10)
    out["publish"] = admin.publish("news", "tcp", {"via": "tcp", "from": "python"})
    with admin.pipeline() as p:
        for n in range(10):
            p.publish("batch", "n", n)
        out["batch"] = [outcome(r) for r in p.execute()]
    admin.close()
    return out


def framing(address):
    """The fake server answers in 1-byte pieces, pipelined replies in uneven
    pieces, then a reply with the wrong request id, then (on a new
    connection) a reply announcing 2 GiB."""
    admin = KometaAdmin(address, timeout=5)
    out = {"short_reads": admin.stats()}
    with admin.pipeline() as p:
        out["pipelined"] = p.ping().ping().ping().execute()
    for case in ("wrong_id", "too_big"):
        try:
            admin.ping()
            out[case] = None
        except KometaProtocolError as error:
            out[case] = str(error)
    return out


def main(argv):
    if len(argv) >= 3 and argv[1] == "unix":
        result = scenario(argv[2])
    elif len(argv) >= 4 and argv[1] == "tcp":
        result = tcp(argv[2], argv[3])
    elif len(argv) >= 3 and argv[1] == "framing":
        result = framing(argv[2])
    else:
        sys.exit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
