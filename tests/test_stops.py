"""Stop strings on streamed text: however the text is split into pieces, what is released is the
text up to where the first completed stop string begins, and nothing that can no longer begin
a stop string is held back."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.stops import StopStrings

alphabet = st.sampled_from("ab\n é")
words = st.text(alphabet, min_size=1, max_size=4)


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Scan the text character by character; stop at the first end of a stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


@st.composite
def split(draw, text):
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet, max_size=20), st.lists(words, min_size=1, max_size=3), st.data())
def test_released_text_is_the_text_cut_at_the_first_stop(text, stops, data):
    pieces = data.draw(split(text))
    s = StopStrings(stops)
    out, stopped = [], False
    for piece in pieces:
        released, stopped = s.add(piece)
        out.append(released)
        if stopped:
            break
        # held back: exactly the longest tail so far that is a proper prefix of a stop string
        seen = "".join(out) + s.held
        longest = max(k for k in range(len(seen) + 1)
                      if any(len(x) > k and x.startswith(seen[len(seen) - k:]) for x in stops))
        assert len(s.held) == longest
    if not stopped:
        out.append(s.flush())
    assert ("".join(out), stopped) == reference(text, stops)


def test_a_stop_string_across_pieces_is_held_then_cut():
    s = StopStrings(["\nSimple"])
    assert s.add("ugly.") == ("ugly.", False)
    assert s.add("\nSim") == ("", False)
    assert s.held == "\nSim"
    assert s.add("ple is") == ("", True)
    s = StopStrings(["\nSimple"])
    assert s.add("ugly.\nSi") == ("ugly.", False)
    assert s.add("lly") == ("\nSilly", False)
    assert s.flush() == ""


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopStrings([""])
