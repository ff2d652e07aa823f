"""The one door every small file of a checkpoint or a bundle goes through before it is read.

Two rules, for the converter and the runtime alike:

- **By type, before any read.** A path must be a regular file (after following symlinks). A FIFO
  would block the reader forever, a device (a symlink to `/dev/zero`) never ends, a directory or a
  socket is nobody's weights. The type is checked with `stat` before the file is opened, so a
  device is never even opened, and again on the open descriptor (`fstat`, the file was opened
  non-blocking), so a file swapped for a FIFO between the two cannot block either.
- **Parsing never raises past the door.** `parse_json` and `parse_yaml` turn every way a text can
  fail to parse into one `NotParsed` (a ValueError) line: besides syntax errors, nesting deep
  enough to exhaust the interpreter's stack (RecursionError) and an integer past Python's digit
  limit (a plain ValueError), which `json` and `yaml` raise as they are.
- **Size limits count the bytes read.** `read_limited` reads at most `limit + 1` bytes and refuses
  the file if it got them; `st_size` is only a hint (a file may grow while it is read, and some
  files report 0).

Errors are `FileRefused`, an OSError (so every reader's existing handling of an unreadable file
applies) whose `strerror` says why and whose `str()` is one line naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat

import yaml

READ_CHUNK = 1 << 16  # small: a read allocates its whole request, even of an empty file
# What each small file may hold at most, counted as it is read. Real ones are far smaller: a
# Gemma3n config.json is 5 kB, its index 100 kB, its tokenizer_config.json 1.2 MB, its
# tokenizer.json 33 MB.
CONFIG_LIMIT = 16 * 1024 * 1024  # config.json, generation_config.json, tokenizer_config.json, the index
TOKENIZER_LIMIT = 256 * 1024 * 1024  # tokenizer.json

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class FileRefused(OSError):
    """A file that is not a regular file, or larger than its reader allows."""

    def __init__(self, path, reason: str):
        super().__init__(errno.EINVAL, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _why(path, mode: int) -> str:
    target = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"{kind_of(mode)}{target}, not a regular file; refusing to read it"


def _refuse_kind(path, mode: int) -> FileRefused:
    return FileRefused(path, _why(path, mode))


def not_regular(path) -> str | None:
    """Why `path` (which exists, or is a dangling symlink) is no regular file, or None if it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None if stat.S_ISREG(mode) else _why(path, mode)


def check_regular(path) -> None:
    """FileRefused unless `path` is a regular file (following symlinks); FileNotFoundError and
    other OSErrors pass through."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse_kind(path, mode)


def is_regular(path) -> bool:
    """Whether `path` exists and is a regular file (following symlinks), without raising."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path) -> int:
    """A blocking read-only descriptor of the regular file `path` (FileRefused otherwise)."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between the stat and the open
            raise _refuse_kind(path, mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path):
    """`open_regular` as a binary file object (closes the descriptor with it)."""
    return os.fdopen(open_regular(path), "rb")


def read_limited(path, limit: int, what: str = "file") -> bytes:
    """The whole regular file `path`, refused once more than `limit` bytes have been read."""
    with open_regular_file(path) as f:
        chunks, total = [], 0
        while total <= limit:
            chunk = f.read(min(READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise FileRefused(path, f"more than {limit} bytes, larger than any {what} this tool reads; "
                                "refusing to read it")
    return b"".join(chunks)


class NotParsed(ValueError):
    """A text that is not valid JSON or YAML; `str()` is one line saying why (the caller names the file)."""


def _why_not(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return first.split("; use sys.set_int_max_str_digits()")[0][:200]  # advice for programmers, not users


def parse_json(raw: bytes | str, **kwargs) -> object:
    """`json.loads(raw)`; NotParsed (one line) for invalid UTF-8 or JSON, nesting deep enough to
    exhaust the stack, or an integer past Python's digit limit."""
    try:
        return json.loads(raw, **kwargs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, digit limits
        raise NotParsed(f"not valid JSON ({_why_not(e)})") from None


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> object:
    """`yaml.safe_load(text)` (the C loader where built); NotParsed (one line) for invalid YAML,
    nesting deep enough to exhaust the stack, or an integer past Python's digit limit."""
    try:
        return yaml.load(text, Loader=_YAML_LOADER)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise NotParsed(f"not valid YAML ({_why_not(e)})") from None
