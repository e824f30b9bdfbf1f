"""A test plan in Python (stdlib only), built by exec:generic.

It reads the TEST_* environment and prints event lines in the Go SDK's JSON
format, which is all the instance contract asks of a plan. Cases: ok, fail, params,
metrics (writes results.out in sdk-go's metric schema, and fails when asked to).
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


def record_point(name, value):
    # One sdk-go metric line in results.out of the instance's outputs directory.
    path = os.path.join(os.environ.get("TEST_OUTPUTS_PATH", "."), "results.out")
    line = {"ts": time.time_ns(), "type": "point", "name": name, "measures": {"value": value}}
    with open(path, "a") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")


def main():
    case = os.environ.get("TEST_CASE", "")
    group = os.environ.get("TEST_GROUP_ID", "")
    params = parse_params(os.environ.get("TEST_INSTANCE_PARAMS", ""))

    if case == "ok":
        message("example-python ok")
        error = None
    elif case == "fail":
        error = "example-python failure requested"
    elif case == "metrics":
        points = int(params.get("points", "5"))
        for i in range(points):
            record_point("step", float(i))
        message("recorded %d points" % points)
        for i in range(int(params.get("lines", "0"))):
            print("output line %d of instance %s" % (i, os.environ.get("TEST_GROUP_INSTANCE_COUNT", "")), flush=False)
        sys.stdout.flush()
        error = "failing on purpose" if params.get("fail") == "true" else None
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
