"""The Python API (`crossvlm.load`, batched generation, streaming, thinking) and `crossvlm chat`."""

from __future__ import annotations

import io

import pytest

import crossvlm
from crossvlm.engine import Request
from crossvlm.inference import ChatModel, InputError, SamplingParams, split_reasoning
from serving import png_bytes, shapes_image

GREEDY = SamplingParams(max_new_tokens=16, greedy=True)


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir) -> ChatModel:
    return crossvlm.load(tiny_vlm_dir, device="cpu")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_batched_greedy_equals_one_prompt_at_a_time(chat):
    # Prompts of different lengths, with none, one or two images, and different token budgets.
    conversations = [
        _user("<image>what colour is the circle?"),
        _user("hello"),
        _user("<image>where is the big red square on the left of the picture and what is next to it?"),
        _user("<image><image>count the shapes"),
        [{"role": "system", "content": "answer briefly"}, *_user("is there a star?"),
         {"role": "assistant", "content": "yes"}, *_user("<image>where?")],
    ]
    images = [[shapes_image(1)], [], [shapes_image(2, (80, 48))], [shapes_image(3), shapes_image(4)],
              [shapes_image(5)]]
    budgets = [SamplingParams(max_new_tokens=n, greedy=True) for n in (16, 6, 16, 11, 16)]
    batched = chat.generate(conversations, images, budgets)
    alone = [chat.generate([c], [i], s)[0] for c, i, s in zip(conversations, images, budgets)]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]
    assert batched[1].completion_tokens <= 6 and batched[3].completion_tokens <= 11
    assert len({c.text for c in batched}) >= 4, "the tiny model should give distinct answers here"
    assert all(c.reasoning is None for c in batched)  # thinking off


def test_content_parts_equal_image_marks(chat):
    image = shapes_image(7)
    marks = chat.chat(_user("<image>describe the image"), [image], GREEDY)
    parts = chat.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes(image)},
                                                     {"type": "text", "text": "describe the image"}]}],
                      sampling=GREEDY)
    assert marks.text and parts.text == marks.text
    assert str(marks) == marks.text


def test_stream_deltas_add_up_to_the_answer(chat):
    pieces = []
    for seed, question in enumerate(["is there a star?", "what colour is the circle?", "count the shapes"]):
        messages = _user("<image>" + question)
        stream = chat.stream(messages, [shapes_image(seed)], GREEDY)
        deltas = [d.text for d in stream]
        assert "".join(deltas) == stream.completion.text == chat.chat(messages, [shapes_image(seed)], GREEDY).text
        pieces.append(len(deltas))
    assert max(pieces) > 1, "answers arrive in pieces"


def test_stop_strings_cut_the_answer(chat):
    messages = _user("<image>is there a star?")
    full = chat.chat(messages, [shapes_image(1)], SamplingParams(max_new_tokens=16, greedy=True))
    stop = full.text[6:10]
    cut = chat.chat(messages, [shapes_image(1)], SamplingParams(max_new_tokens=16, greedy=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and full.finish_reason == "length"
    assert cut.text == full.text[: full.text.find(stop)].strip()
    assert cut.completion_tokens < full.completion_tokens


def test_seeded_sampling_repeats(chat):
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, seed=123)
    first, again = (chat.chat(_user("hello"), sampling=sampled).text for _ in range(2))
    assert first == again


def test_thinking_is_returned_apart_and_streamed_in_order(chat):
    tok = chat.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>\nthe circle is red.\n</think>\n\nIt is red. Anything else?",  # thought, answered
             "<think>\nstill thinking about the",  # budget spent while thinking
             "It is red."]  # a thinking model may also answer directly
    token_rows = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    budgets = [100, len(token_rows[1]) - 1, 100]
    stops = [("Anything",), (), ()]
    events = [[], [], []]
    for i, tokens in enumerate(token_rows):  # the engine hands a request its tokens one at a time
        request = Request([1] * 5, None, SamplingParams(max_new_tokens=budgets[i], stop=stops[i]), events[i].append,
                          thinking=True, stream=True, max_new_tokens=budgets[i])
        for token in tokens:
            if request.done:
                break
            request.add_token(token, tok, chat.eos_ids)
    done = [e[-1] for e in events]
    deltas = [e[:-1] for e in events]
    assert (done[0].reasoning, done[0].text, done[0].finish_reason) == ("the circle is red.", "It is red.", "stop")
    assert (done[1].reasoning, done[1].text, done[1].finish_reason) == ("still thinking about the", "", "length")
    assert (done[2].reasoning, done[2].text) == ("", "It is red.")
    for row, completion in zip(deltas, done):
        assert "".join(d.reasoning for d in row) == (completion.reasoning or "")
        assert "".join(d.text for d in row) == completion.text  # nothing of the stop string leaked
        first_text = next(i for i, d in enumerate(row + [None]) if d is None or d.text)
        assert not any(d.reasoning for d in row[first_text:]), "reasoning comes before the answer"


def test_split_reasoning():
    assert split_reasoning("<think>\na\n</think>\n\nb", thinking=True) == ("a", "b")
    assert split_reasoning("<think>\na\n</think>\n\nb", thinking=False) == (None, "<think>\na\n</think>\n\nb")
    assert split_reasoning("<thi", thinking=True, final=False) == ("", "")
    assert split_reasoning("<think>a", thinking=True) == ("a", "")


def test_bad_inputs_raise_input_error_with_a_code(chat, tmp_path):
    cases = [
        (_user("<image><image>two marks"), [shapes_image(0)], "image_count_mismatch"),
        (_user("no marks"), [shapes_image(0)], "image_count_mismatch"),
        (_user("sneaky <|image_pad|>"), [], "invalid_content"),
        (_user("<image>?"), [b"not an image"], "invalid_image"),
        (_user("<image>?"), [tmp_path / "missing.png"], "image_not_found"),
        (_user("word " * (chat.context_length + 10)), [], "context_length_exceeded"),
    ]
    for messages, images, code in cases:
        with pytest.raises(InputError) as err:
            chat.prompt(messages, images)
        assert err.value.code == code, str(err.value)
    big = tmp_path / "big.png"
    shapes_image(0, (300, 300)).save(big)
    small_limit = ChatModel(chat.model, chat.processor, max_image_pixels=200 * 200)
    with pytest.raises(InputError) as err:
        small_limit.prompt(_user("<image>?"), [str(big)])
    assert err.value.code == "image_too_large"


# -- crossvlm chat ------------------------------------------------------------------------------
def test_chat_command_streams_one_answer(chat, tiny_vlm_dir, tmp_path, capsys):
    from crossvlm.cli import main

    path = tmp_path / "shapes.png"
    shapes_image(3).save(path)
    assert main(["chat", "--model", str(tiny_vlm_dir), "--image", str(path), "--prompt", "count the shapes",
                 "--greedy", "--max-new-tokens", "16", "--device", "cpu"]) == 0
    expected = chat.chat(_user("<image>count the shapes"), [shapes_image(3)], GREEDY).text
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_chat_keeps_history_adds_images_and_resets(chat, tiny_vlm_dir, tmp_path, capsys,
                                                                monkeypatch):
    from crossvlm.cli import main

    path = tmp_path / "shapes.png"
    shapes_image(4).save(path)
    script = f"hello\n/image {path}\nwhat colour is the circle?\n/image {tmp_path}/nope.png\n/reset\nhello\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(tiny_vlm_dir), "--greedy", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    budget = SamplingParams(max_new_tokens=12, greedy=True)
    first = chat.chat(_user("hello"), sampling=budget).text
    second = chat.chat([*_user("hello"), {"role": "assistant", "content": first},
                        *_user("<image>what colour is the circle?")], [shapes_image(4)], budget).text
    assert out.splitlines() == [first, second, first]  # after /reset the history is gone
    assert "nope.png" in err and "reset" in err


def test_a_jpeg_reaches_the_model_as_the_training_loader_gives_it(chat, tmp_path):
    """Inference decodes a JPEG as the training loader does (at the smallest DCT scale that keeps the
    tower's side, then the processor), so the model sees the pixels it was trained on: from bytes,
    from a path, through the chat API and through the server's image URLs."""
    import base64

    import numpy as np
    import torch
    from PIL import Image

    from crossvlm.data.images import ImageTransform, load_image
    from crossvlm.serve.images import ImagePolicy, image_from_url

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    transform = ImageTransform(chat.processor.image_processor)
    assert transform.draft_size and transform.draft_size * 2 <= 480  # the draft scale is not 1 here
    trained = transform.normalize(transform([load_image(jpeg, 10**8, transform.draft_size)]))  # what a training step sees
    full = transform.normalize(transform([load_image(jpeg, 10**8)]))
    assert not torch.equal(trained, full), "the test image must tell the two decodings apart"
    for source in (jpeg, tmp_path / "photo.jpg", str(tmp_path / "photo.jpg")):
        prompt = chat.prompt(_user("<image>what is this?"), [source])
        assert torch.equal(prompt.pixel_values, trained)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    served = image_from_url(url, ImagePolicy(), "image_url", chat.draft_size)
    assert torch.equal(chat.prompt(_user("<image>what is this?"), [served]).pixel_values, trained)
