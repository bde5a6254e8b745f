"""`crossvlm` as an lmms-eval model: `lmms-eval --model crossvlm --model_args pretrained=DIR --tasks ...`.

lmms-eval hands a "simple" model its requests as `Instance`s whose `args` are (prompt text,
generation kwargs, doc_to_visual, doc id, task, split). Each becomes a one-turn conversation (the
task's images first when the prompt has no `<image>` marks, as MME and most benchmarks are
written) and is answered through crossvlm's own batched generation, `ChatModel.prompt` +
`ChatModel.generate_prompts`: the same path as `crossvlm eval`, `chat` and `serve`.

Only generation is offered: tasks scored by log-likelihood (`output_type: loglikelihood` /
`multiple_choice`) and multi-round generation raise NotImplementedError.
"""

from __future__ import annotations

from itertools import islice

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from crossvlm.inference import InputError, SamplingParams, load
from crossvlm.model.tokens import IMAGE_MARK


def sampling_from_gen_kwargs(gen_kwargs: dict, default_max_new_tokens: int) -> SamplingParams:
    """crossvlm sampling settings from a task's `generation_kwargs` (greedy unless it asks to sample)."""
    gen = dict(gen_kwargs)
    until = gen.pop("until", None) or ()
    stop = (until,) if isinstance(until, str) else tuple(until)
    if int(gen.get("num_beams") or 1) > 1:
        raise NotImplementedError("crossvlm generates without beam search; set num_beams: 1")
    temperature = float(gen.get("temperature") or 0.0)
    greedy = not gen.get("do_sample", False) or temperature == 0
    return SamplingParams(
        max_new_tokens=int(gen.get("max_new_tokens") or default_max_new_tokens), greedy=greedy,
        temperature=temperature if not greedy else 0.0, top_p=float(gen.get("top_p") or 1.0),
        top_k=int(gen.get("top_k") or 0), stop=stop,
    )


def conversation(context: str, n_images: int, where: str) -> list[dict]:
    """The user turn for a prompt and its images: the images lead unless the prompt places them."""
    marks = context.count(IMAGE_MARK)
    if marks == 0 and n_images:
        context = IMAGE_MARK * n_images + "\n" + context
    elif marks != n_images:
        raise ValueError(f"{where}: the prompt has {marks} {IMAGE_MARK} marks but the task gives {n_images} images")
    return [{"role": "user", "content": context}]


class CrossVLMLmms(lmms):
    """lmms-eval model arguments (`--model_args k=v,...`):

    pretrained: a saved crossvlm model directory.
    device: "auto" (cuda if available), "cpu", "cuda:1", ...
    batch_size: prompts generated together (lmms-eval's --batch_size sets it too).
    max_new_tokens: the answer budget when a task does not set one.
    thinking: let Qwen3 think before answering (the reasoning is not scored).
    """

    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 8,
                 max_new_tokens: int | str = 256, thinking: bool | str = False,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        problems = []
        if unknown:
            problems.append(f"unknown crossvlm model_args: {', '.join(sorted(unknown))} (known: pretrained, "
                            "device, batch_size, max_new_tokens, thinking)")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            problems.append(f"batch_size must be a whole number >= 1, got {batch_size!r} (no automatic sizing)")
        if not str(max_new_tokens).isdigit() or int(max_new_tokens) < 1:
            problems.append(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if max_batch_size is not None:
            problems.append("--max_batch_size is not supported: crossvlm generates batch_size prompts at a time")
        if problems:
            raise ValueError("; ".join(problems))
        self.chat = load(pretrained, device=device)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.thinking = str(thinking).lower() in ("1", "true", "yes")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request, `batch_size` prompts at a time; the engine gives each its own settings."""
        answers: list[str] = []
        stream = iter(requests)
        while chunk := list(islice(stream, self.batch_size)):
            prompts, settings = [], []
            for request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
                where = f"{task}/{split} doc {doc_id}"
                try:
                    prompts.append(self.chat.prompt(conversation(context, len(visuals), where), list(visuals),
                                                    self.thinking))
                except InputError as err:
                    raise InputError(f"{where}: {err}", err.code, err.param) from err
                settings.append(sampling_from_gen_kwargs(gen_kwargs, self.max_new_tokens))
            answers += [completion.text for completion in self.chat.generate_prompts(prompts, settings)]
        return answers

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("crossvlm answers generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("crossvlm answers single-round generation tasks only")
