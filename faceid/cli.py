"""How every script ends: quiet third-party notices, run ``main``, and turn a user's mistake (a missing file, a bad
index, an unreachable Hub, a wrong flag combination) into its message and exit code 1 — no traceback, since the
message already says what is wrong and what to do (status 2, as argparse's usage errors). Programming errors
still show their traceback."""

from __future__ import annotations

import os
import sys

# Exceptions that describe bad input, as (module, class). Only modules already imported can have raised one, so
# nothing is imported here to look them up.
_USER_ERRORS = (
    ("faceid.errors", "InputError"),
    ("faceid.face.images", "ImageLoadError"),
    ("faceid.face.face_info", "FaceInfoError"),
    ("faceid.face.analysis", "NoFaceModelError"),
    ("faceid.train.errors", "TrainingInputError"),
    ("faceid.hub.client", "HubError"),
    ("faceid.hub.datasets", "UnsafeArchiveError"),
    ("ip_adapter.weights", "AdapterWeightsError"),
    ("ip_adapter.utils", "DiskFullError"),
    ("faceid.weight_files", "WeightFileError"),
)


USER_ERROR = 2  # exit status of a user's mistake


def user_errors() -> tuple[type[BaseException], ...]:
    found = [FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    for module, name in _USER_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            found.append(getattr(mod, name))
    return tuple(found)


def run(main, parse_args, argv=None) -> None:
    """``sys.exit`` with ``main(parse_args(argv))``'s code: an int result is the code, anything else is 0."""
    from faceid.runtime import quiet_third_party

    quiet_third_party()
    prog = os.path.basename(sys.argv[0]) or "faceid"
    try:
        result = main(parse_args(argv))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors() as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(USER_ERROR)
    except SystemExit as done:  # raise SystemExit("message") in a script: the same status as the errors above
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            sys.exit(USER_ERROR)
        raise
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
