"""3-turn chats with an image through the engine, each turn re-sending the conversation (as an
OpenAI client does): the time to each turn's first token (turn 1 finds nothing of its chat in the
cache; turns 2 and 3 find the earlier turns' blocks and do not encode the image again), and the
prompt tokens the cache held (docs/PERFORMANCE.md, "The engine at scale").
Usage: python3 bench/chat_turns.py MODELS_DIR [HISTORY_WORDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from PIL import Image

from crossvlm.engine import Delta, EngineConfig, SamplingParams
from crossvlm.inference import ChatModel
from crossvlm.model.modeling import CrossVLM
from crossvlm.model.processor import CrossVLMProcessor


def first_token_ms(chat: ChatModel, messages, image) -> tuple[float, object]:
    """Milliseconds from submission to the first token (a stream's first delta), and the completion."""
    start = time.perf_counter()
    stream = chat.stream(messages, [image], SamplingParams(max_new_tokens=32, greedy=True, ignore_eos=True))
    pieces = iter(stream)
    first = next(pieces)
    ms = (time.perf_counter() - start) * 1000
    assert isinstance(first, Delta)
    for _ in pieces:
        pass
    return ms, stream.completion


def main() -> None:
    models = sys.argv[1]
    words = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    repeats = 5
    cuda = torch.cuda.is_available()
    model = CrossVLM.from_base_models(f"{models}/llm", f"{models}/vision", dtype=torch.bfloat16 if cuda else None)
    model = model.to("cuda" if cuda else "cpu").eval()
    processor = CrossVLMProcessor.from_base_models(f"{models}/llm", f"{models}/vision", model.num_image_tokens)
    image = Image.effect_noise((320, 240), 59).convert("RGB")
    history = " ".join(f"word{i % 97}" for i in range(words))
    turns = [f"<image>{history} what is in this picture?", "and what colour is it?", "is there anything else?"]
    chat = ChatModel(model, processor, engine=EngineConfig(slots=8, max_len=4096))
    chat.engine.warm_up()
    first_token_ms(chat, [{"role": "user", "content": "<image>hello"}], image)  # the first step of each kind
    rows = [[], [], []]  # per turn: (ms, prompt tokens, cached tokens) of each chat
    for seed in range(repeats):  # each chat its own image: its first turn finds nothing of it in the cache
        image = Image.effect_noise((320, 240), 60 + seed).convert("RGB")
        messages = []
        for turn, text in enumerate(turns):
            messages = [*messages, {"role": "user", "content": text}]
            ms, done = first_token_ms(chat, messages, image)
            rows[turn].append((ms, done.prompt_tokens, done.cached_tokens))
            messages = [*messages, {"role": "assistant", "content": done.text}]
    medians = [statistics.median(ms for ms, _, _ in runs) for runs in rows]
    for turn, runs in enumerate(rows):
        print(f"turn {turn + 1}: first token {medians[turn]:.1f} ms (median of {repeats} chats), prompt "
              f"{runs[0][1]} tokens, {runs[0][2]} from the prefix cache")
    print(f"turn 3 / turn 1: {medians[2] / medians[0]:.2f}")
    chat.close()


if __name__ == "__main__":
    main()
