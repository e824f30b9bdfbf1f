"""A test plan in Python (stdlib only), built by exec:generic.

It reads the TEST_* environment and prints event lines in the Go SDK's JSON
format, which is all the instance contract asks of a plan. Cases: ok, fail, params.
"""

import json
import os
import sys
import time


def parse_params(raw):
    # Same rules as sdk-go: pairs that do not split into exactly two parts are dropped.
    params = {}
    for pair in raw.split("|"):
        parts = pair.split("=")
        if len(parts) == 2:
            params[parts[0]] = parts[1]
    return params


def emit(event):
    line = {
        "ts": time.time_ns(),
        "msg": "",
        "group_id": os.environ.get("TEST_GROUP_ID", ""),
        "run_id": os.environ.get("TEST_RUN", ""),
        "event": event,
    }
    print(json.dumps(line, separators=(",", ":")), flush=True)


def message(text):
    emit({"message_event": {"message": text}})


def main():
    case = os.environ.get("TEST_CASE", "")
    group = os.environ.get("TEST_GROUP_ID", "")
    params = parse_params(os.environ.get("TEST_INSTANCE_PARAMS", ""))

    if case == "ok":
        message("example-python ok")
        error = None
    elif case == "fail":
        error = "example-python failure requested"
    elif case == "params":
        message("params: " + json.dumps(params, sort_keys=True))
        error = None
    else:
        error = "unrecognized test case: " + case

    if error is None:
        emit({"success_event": {"group": group}})
        return 0
    emit({"failure_event": {"group": group, "error": error}})
    return 1


if __name__ == "__main__":
    sys.exit(main())
