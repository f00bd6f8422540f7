import json

from pricing.load.sse import parse_stream


def ev(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def text(t, finish=None):
    return ev({"id": "r1", "choices": [{"index": 0, "text": t, "finish_reason": finish}]})


USAGE = ev({"id": "r1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"


def test_events_split_across_reads_are_stamped_by_the_read_that_completes_them():
    blob = text("a") + text("b") + text("c", "length") + USAGE + DONE
    first_cut = len(text("a")) + 5  # the second event ends in the second read
    reads = [blob[:first_cut], blob[first_cut:]]
    out = parse_stream([100, 200], reads)
    assert out.chunk_ns == [100, 200, 200]
    assert (out.prompt_tokens, out.completion_tokens, out.response_id, out.error) == (7, 3, "r1", None)


def test_chat_role_only_delta_is_not_a_token():
    role = ev({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    tok = ev({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
    out = parse_stream([1, 2, 3], [role, tok, USAGE + DONE], chat=True)
    assert out.chunk_ns == [2]


def test_missing_done_is_incomplete_and_error_event_is_stream_error():
    assert parse_stream([1], [text("a")]).error == "incomplete"
    assert parse_stream([1], [ev({"error": {"message": "boom"}}) + DONE]).error == "stream_error"
    assert parse_stream([], []).chunk_ns == []
