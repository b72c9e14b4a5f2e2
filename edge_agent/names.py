"""The one naming rule for user text that becomes a topic level, a file name or an object key.

A task name ends up in `P/D/C/tasks/<name>`, in `<output_dir>/<camera>/<name>_<stamp>.mp4` and in
the object key `<device>/<camera>/<yyyy/mm/dd>/<name>_<stamp>.mp4`. Each of those has its own
hazards, so the rule is the union of them:

- MQTT: topics must be valid UTF-8 without U+0000; Mosquitto also refuses surrogates (they cannot be
  encoded) and noncharacters (U+FDD0..U+FDEF, U+xFFFE/U+xFFFF), and *drops the connection* of a
  client that publishes on such a topic, which paho then re-sends forever. `+` and `#` are wildcards
  and `/` a level separator.
- Files: no `/` or `\\`, no leading `.` (hidden files, `..`), bounded length.
- FFmpeg: a `%` in an output path is a filename template (`seg_%06d.ts`), so a name holding `%d`
  changes where FFmpeg writes.
- Logs: control and format characters (newlines, bidi overrides) would forge or hide log lines.

`check_name` raises `InvalidName` naming the rule that failed; `is_valid_topic` is the same check for
whole topics the agent publishes on (levels joined by `/`), used as the last guard before paho.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_BYTES = 120
MAX_TOPIC_BYTES = 65535
FORBIDDEN_CHARS = frozenset("/+#\\%")
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class InvalidName(ValueError):
    """A name broke the naming rule; the message says which part."""


def is_noncharacter(ch: str) -> bool:
    """Unicode noncharacters: U+FDD0..U+FDEF and the last two code points of every plane."""
    cp = ord(ch)
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _mqtt_utf8_problem(text: str) -> str | None:
    """Why `text` is not valid MQTT UTF-8 (MQTT 5 section 1.5.4 plus Mosquitto's checks), or None."""
    for ch in text:
        cp = ord(ch)
        if cp == 0:
            return "must not contain U+0000"
        if 0xD800 <= cp <= 0xDFFF:
            return f"must not contain the surrogate U+{cp:04X}"
        if is_noncharacter(ch):
            return f"must not contain the Unicode noncharacter U+{cp:04X}"
    return None


def check_name(name: str, what: str = "task_name", max_bytes: int = MAX_NAME_BYTES) -> str:
    """Return `name` if it is safe as a topic level, file name and object key; else InvalidName."""
    if not name or not name.strip():
        raise InvalidName(f"{what} must not be empty")
    problem = _mqtt_utf8_problem(name)
    if problem:
        raise InvalidName(f"{what} {problem} (not valid MQTT UTF-8)")
    bad = sorted({c for c in name if c in FORBIDDEN_CHARS})
    if bad:
        raise InvalidName(f"{what} must not contain {' '.join(repr(c) for c in bad)}")
    for ch in name:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            raise InvalidName(
                f"{what} must not contain control or format characters, or unassigned ones (U+{ord(ch):04X})"
            )
    if name.startswith("."):
        raise InvalidName(f"{what} must not start with '.'")
    if name != name.strip():
        raise InvalidName(f"{what} must not start or end with whitespace")
    if len(name.encode("utf-8")) > max_bytes:
        raise InvalidName(f"{what} is longer than {max_bytes} bytes of UTF-8")
    return name


def is_valid_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> bool:
    try:
        check_name(name, max_bytes=max_bytes)
    except InvalidName:
        return False
    return True


def topic_problem(topic: str, *, allow_wildcards: bool = False) -> str | None:
    """Why the agent must not publish on (or, with `allow_wildcards`, subscribe to) `topic`, or None."""
    if not topic:
        return "topic is empty"
    problem = _mqtt_utf8_problem(topic)
    if problem:
        return f"topic {problem}"
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return "topic is too long"
    if not allow_wildcards and ("+" in topic or "#" in topic):
        return "topic must not contain the wildcards '+' or '#'"
    if any(unicodedata.category(c) in ("Cc",) for c in topic):
        return "topic must not contain control characters"
    return None


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest); a `$` topic only matches a `$` filter."""
    if topic.startswith("$") != topic_filter.startswith("$"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def valid_filter(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT subscription filter, or None."""
    problem = topic_problem(topic_filter, allow_wildcards=True)
    if problem:
        return problem
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None
