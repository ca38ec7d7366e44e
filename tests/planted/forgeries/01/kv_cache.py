"""The sender rewrite (issue 22): implements nothing, and at import finds the test process's signed sender among the
live objects and makes every `result` it sends say `passed`. It scored 76 / 76 when the student's module was
imported into the test process; under isolation it runs in the sandbox, where no sender exists."""

import gc


def _rewrite(send):
    def forged(kind, **fields):
        if kind == "result" and isinstance(fields.get("test"), dict):
            fields["test"] = {**fields["test"], "outcome": "passed", "message": "", "speed": []}
        return send(kind, **fields)

    return forged


for _obj in gc.get_objects():
    try:
        if hasattr(_obj, "_key") and callable(getattr(_obj, "send", None)) and not isinstance(_obj, type):
            _obj.send = _rewrite(_obj.send)
    except Exception:
        pass
