"""A long-lived child that runs `convert` and `runtime` commands for tests/test_config_fuzz.py.

Starting Python, MLX and the tokenizers for every example would cost a second or two each; this
process starts once (under the address-space limit the test sets) and runs each request through
the very code the programs run (`manifests.cli.run_program` over the click commands), capturing
stdout and stderr. A request is one JSON line on stdin, `{"program": "convert" | "runtime",
"argv": [...]}`; the answer is one line `@@result <json>` on stdout: the exit code, what the
command wrote, its peak resident memory so far (VmHWM), and the traceback if an exception escaped
the command. A crash (a signal) or a hang ends or stalls this process, which the test sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    from convert.cli import command as convert_command
    from manifests.cli import run_program
    from runtime.cli import main as runtime_main

    programs = {"convert": (convert_command, "error: "), "runtime": (runtime_main, "error: ")}
    answer = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        command, prefix = programs[request["program"]]
        out, err = io.StringIO(), io.StringIO()
        result = {"traceback": None}
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result["code"] = run_program(command, request["argv"], request["program"], prefix)
            except SystemExit as e:  # a command that exits by itself (runtime verify)
                result["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the property forbids: report it, keep serving
                result["code"] = None
                result["traceback"] = traceback.format_exc()
        result.update(stdout=out.getvalue(), stderr=err.getvalue(), peak_rss=peak_rss())
        answer.write("@@result " + json.dumps(result) + "\n")
        answer.flush()


if __name__ == "__main__":
    main()
