"""The model steps: prompt embedding (images encoded once), prefill, decode; CUDA graphs on a GPU.

The LLM is the stock `Qwen3ForCausalLM`; its decoder (`llm.model`) is called with our cache
(`PagedCache`, which the attention layers write into), explicit positions and a `Plan` that says
where each token writes and what each sequence reads (`paged_attention` gets it through the model's
keyword arguments), so transformers builds no mask and keeps no cache of its own.

- `embed`: token embeddings with the visual tokens merged (`CrossVLM.embed`), for the prompts (or the
  parts of them not found in the prefix cache) of several requests at once: the vision tower and
  projector run once per image, here.
- `prefill`: chunks of prompt embeddings of several requests packed into one row, no padding, each
  with its request's block table; the last chunk of a prompt samples its first token.
- `decode`: one token for each of the first `rows` rows (a request keeps its row, `slot`, while it
  runs; its KV lives in its blocks). On a GPU the step (embedding, decoder, LM head) is recorded as a
  CUDA graph per batch rung, reading the rows' block tables, positions and last tokens from buffers
  the host updates in place, so a step is one graph replay. With FlashAttention (`flash`) or the
  Triton decode kernel (`triton_decode`, crossvlm.engine.paged_decode) each row reads its own length
  of its blocks; otherwise attention gathers the first `kv_len` positions of
  every row, the smallest rung of a second ladder that holds the longest running request, and a
  graph is recorded per (rows, kv_len) pair. A graph is recorded the first time a step needs it (a
  server records them all before its first request: `warm_up`). Sampling follows, eagerly (a few
  kernels).
- The first token of a request that arrives alone: on a GPU its prefill (one prompt, padded to a
  length bucket by a throw-away chunk in the scratch block) and its image path (vision tower and
  projector, images padded to a rung of 1, 2, 4, … 16) are replayed as CUDA graphs too, one per
  bucket and rung. Launching them op by op took 11 ms (image path) and 16 ms (prefill) of host time
  with `--compile` for 6 ms of GPU work (docs/PERFORMANCE.md, "Generation engine").

With `compile`, the decode step and the prefill's decoder run through `torch.compile` (Inductor), and
the image path (vision layers, projector) layer by layer: their many small kernels (RMSNorm pieces,
rotary, residual adds) fuse, which is what makes a step fast at small batches, where launching
kernels, not the GPU, sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from crossvlm.engine.blocks import SCRATCH
from crossvlm.engine.cache import PagedCache, Plan, write_positions
from crossvlm.engine.sampler import Sampler, to_device
from crossvlm.model.modeling import _CACHE_KWARG, image_positions_of
from crossvlm.model.vision import vision_layers


@dataclass
class Chunk:
    """Prompt positions [start, start + len(embeds)) of the request in row `slot`, written into its `blocks`."""

    slot: int
    start: int
    embeds: torch.Tensor  # (T, D)
    last: bool
    """Whether the prompt ends here (then its first token is sampled, and the row decodes from the next step)."""
    blocks: list[int]
    """The request's block table (every block it holds, the one its first decoded token goes into too)."""


PREFILL_GRAPH_TOKENS = 2048
"""Prefills of one prompt shorter than this replay a CUDA graph of their length bucket (128, 256, … this)."""
IMAGE_GRAPH_IMAGES = 16
"""Admissions of up to this many images replay a CUDA graph of the image path (1, 2, 4, … this images)."""


def ladder(top: int, first: int) -> list[int]:
    """first, 2·first, 4·first, … up to and including `top`."""
    rungs, n = [], first
    while n < top:
        rungs.append(n)
        n *= 2
    return rungs + [top]


class ModelRunner:
    def __init__(self, model, cache: PagedCache, sampler: Sampler, rows: int, max_len: int, graphs: bool,
                 compile: bool = False, kv_step: int = 256, flash: bool = False, triton_decode: bool = False):
        self.model, self.llm, self.cache, self.sampler = model, model.llm, cache, sampler
        self.device = next(model.llm.parameters()).device
        self.dtype = model.llm.dtype
        self.rows, self.block_size = rows, cache.block_size
        # A row's block table has one column more than the longest request needs (always the scratch
        # block): no read covers the whole width, which torch.compile would specialize.
        self.width = -(-max_len // cache.block_size) + 1
        # The decode step's state per row (the idle-row rule, `_decode_step`, reads `live`): the next
        # write, whether a request decodes in the row, and its block table.
        self.position = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.live = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.block_table = torch.full((rows, self.width), SCRATCH, dtype=torch.int32, device=self.device)
        # torch.compile specializes a size of 1: compiled, one request decodes in the batch-2 step (the other
        # row idle), and one prompt prefills beside a throw-away one, so a single compilation serves
        # every batch size of each (each one takes a minute or more for the whole model).
        self.compiled = compile
        self.flash = flash
        """Attention through FlashAttention's paged kernel: each sequence reads its own length of its
        blocks, so the decode step needs no length rungs."""
        self.triton_decode = triton_decode
        """Decode attention through `paged_decode`'s kernel, which also reads each sequence's own length:
        no length rungs either (prefills as `flash` says)."""
        self.batch_ladder = ladder(rows, 2 if compile and rows > 1 else 1)
        step = -(-kv_step // self.block_size) * self.block_size  # a multiple of the block size
        top = (self.width - 1) * self.block_size
        self.kv_ladder = [self.width * self.block_size] if flash or triton_decode else [min(n, top) for n in range(step, top + step, step)]
        self.logits = torch.zeros(rows, model.config.text_config.vocab_size, dtype=self.dtype,
                                  device=self.device)  # the decode step's output
        self.use_graphs = graphs
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None  # the graphs' one memory pool (one step runs at a time)
        # A lone prompt's prefill and the image path, replayed too (see the module's docstring); a graph's
        # output lives in the pool: it is read before the next replay
        self.prefill_buckets = ladder(min(PREFILL_GRAPH_TOKENS, max_len), 128) if graphs else []
        # (a tiled model's image path stays eager: its views and their places vary per request)
        self.image_rungs = ladder(IMAGE_GRAPH_IMAGES, 1) if graphs and model.config.max_tiles == 1 else []
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = {}  # graph, output, inputs
        self.image_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # graph, output, input
        # Sizes stay symbolic (dynamic=True), so the rungs and prompt lengths share one compilation. The
        # buffers allocated once are marked static: a symbolic size is tied to any other of the same value
        # when first traced (kv_len to the table's width, say), which would recompile at the next rung.
        self._step = torch.compile(self._decode_step, dynamic=True) if compile else self._decode_step
        self._prefill_decoder = torch.compile(self._decoder, dynamic=True) if compile else self._decoder
        if compile:
            for buffer in [*cache.keys, *cache.values, self.position, self.live, self.block_table, self.logits,
                           sampler.last_token]:
                torch._dynamo.mark_static(buffer)
            # The image path layer by layer, as training compiles it: one graph serves every layer.
            for module in [*vision_layers(model.vision), model.projector]:
                module.compile(dynamic=True)
        if graphs:
            torch.cuda.synchronize(self.device)
            self._decode_step(1, self.kv_ladder[0])  # first call eagerly: transformers sets up its hooks here
            self.park_all()

    def _decoder(self, embeds: torch.Tensor, positions: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Hidden states (B, T, D) of embeddings (B, T, D) at positions (B, T), attending as `plan` says."""
        self.cache.plan = plan
        masks = {"full_attention": None, "sliding_attention": None}  # paged_attention reads the plan instead
        out = self.llm.model(inputs_embeds=embeds, position_ids=positions, attention_mask=masks, use_cache=False,
                             engine_plan=plan, **{_CACHE_KWARG: self.cache})
        return out.last_hidden_state

    # -- prompts ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], pixel_values: torch.Tensor | None,
              image_grids: list | None = None) -> list[torch.Tensor]:
        """Embeddings (T_i, D) of each prompt, visual tokens merged; `pixel_values` (N, 3, H, W) holds
        the prompts' images in order (tiled, with `image_grids`: every image's views, crossvlm.model.tiling)."""
        longest = max(map(len, prompts))
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # (n, T), right-padded with id 0 (not an image)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        self.model.check_image_tokens(ids, 0 if pixel_values is None else pixel_values.shape[0], image_grids)  # on the host
        pixels = positions = features = None
        if pixel_values is not None:  # where the visual tokens go, found on the host: no mask ops on the device
            pixels = to_device(pixel_values, self.device)
            positions = to_device(image_positions_of(ids, self.model.config.image_token_id), self.device)
            # Tiled images run eagerly: their views' places vary, so no graph of a fixed rung replays them.
            features = self._encode(pixels) if image_grids is None else self.model.encode_images(pixels, image_grids)
        embeds = self.model.embed(to_device(ids, self.device), pixels, positions, features)  # (n, T, D)
        return [embeds[i, :len(p)] for i, p in enumerate(prompts)]

    @torch.inference_mode()
    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings (T, D) of ids taken as text (a preempted request's answer so far)."""
        return self.llm.get_input_embeddings()(to_device(torch.tensor(ids), self.device))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The images' visual tokens (N, M, D): a CUDA graph of the image path for the smallest rung that
        holds N images (the rest of its input is padding, computed and dropped), recorded on first use."""
        n = pixels.shape[0]
        rung = next((r for r in self.image_rungs if r >= n), None)
        if rung is None:
            return self.model.encode_images(pixels)
        if rung not in self.image_graphs:
            static = pixels.new_zeros(rung, *pixels.shape[1:])
            static[:n] = pixels
            features = self.model.encode_images(static)  # for real (and the warm-up a recording needs)
            self.image_graphs[rung] = (*self._capture(lambda: self.model.encode_images(static)), static)
            return features[:n]
        graph, features, static = self.image_graphs[rung]
        static[:n] = pixels
        graph.replay()
        return features[:n]

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk], greedy: bool, penalty: bool, min_tokens: bool,
                candidates: int | None = None) -> torch.Tensor | None:
        """Run the chunks, packed into one row; returns the sampled first tokens of the chunks that end
        a prompt (in order). Their rows decode from the next step on."""
        bucket = next((b for b in self.prefill_buckets if b > len(chunks[0].embeds)), None) if len(chunks) == 1 else None
        if bucket:  # one prompt, padded to its bucket with a throw-away chunk in the scratch block
            pad = chunks[0].embeds.new_zeros(bucket - len(chunks[0].embeds), chunks[0].embeds.shape[1])
            chunks = [*chunks, Chunk(0, 0, pad, last=False, blocks=[])]
        elif self.compiled and len(chunks) == 1:  # see __init__
            chunks = [*chunks, Chunk(0, 0, chunks[0].embeds[:1], last=False, blocks=[])]
        sizes = [len(c.embeds) for c in chunks]
        ends = torch.tensor(sizes).cumsum(0)  # (n,) on the host
        # (2, n): each row contiguous. Columns of an (n, 2) tensor would have a stride of 2, which torch.compile
        # ties to n when n == 2 (the warm-up's two rows) and then compiles again for every other n.
        host = torch.tensor([[c.start for c in chunks], [c.start + n for c, n in zip(chunks, sizes)]])
        table = torch.full((len(chunks), self.width), SCRATCH, dtype=torch.int32)  # (n, W)
        for i, c in enumerate(chunks):
            table[i, :len(c.blocks)] = torch.tensor(c.blocks, dtype=torch.int32)
        starts, used = to_device(host, self.device).unbind(0)
        table = to_device(table, self.device)
        if self.compiled:  # the width is fixed: a symbolic one would be tied to another size of its value
            torch._dynamo.mark_static(table, 1)
        cu_q = to_device(torch.cat([torch.zeros(1, dtype=torch.int64), ends]), self.device)
        total = int(ends[-1])
        seq = torch.repeat_interleave(torch.arange(len(chunks), device=self.device), cu_q.diff(), output_size=total)
        positions = starts[seq] + torch.arange(total, device=self.device) - cu_q[seq]  # (S,)
        full = self.width * self.block_size
        # the reference kernel's reads: up to the longest sequence's end in whole blocks (a graph's: all)
        kv_len = full if self.flash or bucket else min(-(-int(host[1].max()) // self.block_size) * self.block_size, full)
        # Compiled, a bound of 1 would specialize (a prompt's one-token last chunk beside the scratch row).
        plan = Plan(table, write_positions(table, seq, positions, self.block_size), cu_q.int(), used.int(),
                    max_q=bucket or max(*sizes, 2 if self.compiled else 1), kv_len=kv_len, token_seq=seq, flash=self.flash)
        embeds = torch.cat([c.embeds for c in chunks])[None]  # (1, S, D)
        if bucket and self.use_graphs:
            hidden = self._prefill_graph(bucket, embeds, positions, plan)
        else:
            hidden = self._prefill_decoder(embeds, positions[None], plan)[0]  # (S, D)
        last = [i for i, c in enumerate(chunks) if c.last]
        if not last:
            return None
        rows = to_device(last, self.device)
        logits = self.llm.lm_head(hidden[cu_q[rows + 1] - 1])  # (m, V)
        done = to_device([chunks[i].slot for i in last], self.device)
        self.position[done] = used[rows]
        self.block_table[done] = table[rows]
        self.live[done] = True
        return self.sampler.sample(logits, done, greedy=greedy, penalty=penalty, min_tokens=min_tokens,
                                   candidates=candidates)

    _PLAN_INPUTS = ("block_table", "write_at", "cu_q", "used", "token_seq")

    def _prefill_graph(self, bucket: int, embeds: torch.Tensor, positions: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Hidden states (S, D) of a padded prefill of `bucket` tokens: its bucket's CUDA graph replayed
        on the new inputs, or, the first time, the prefill run for real and then recorded."""
        inputs = {"embeds": embeds, "positions": positions, **{name: getattr(plan, name) for name in self._PLAN_INPUTS}}
        if bucket in self.prefill_graphs:
            graph, hidden, static = self.prefill_graphs[bucket]
            for name, value in inputs.items():
                static[name].copy_(value)
            graph.replay()
            return hidden
        static = {name: value.clone() for name, value in inputs.items()}
        fixed = replace(plan, **{name: static[name] for name in self._PLAN_INPUTS})
        run = lambda: self._prefill_decoder(static["embeds"], static["positions"][None], fixed)[0]  # noqa: E731
        hidden = run()
        self.prefill_graphs[bucket] = (*self._capture(run), static)
        return hidden

    def grow(self, rows: list[int], columns: list[int], blocks: list[int]) -> None:
        """Write new entries into rows' block tables (a request's context crossed into a new block)."""
        if rows:
            index = to_device(torch.tensor([rows, columns]), self.device)
            self.block_table[index[0], index[1]] = to_device(blocks, self.device, torch.int32)

    def park(self, rows: list[int]) -> None:
        """Make rows idle (a request left, or has not finished its prefill): see `_decode_step`."""
        index = to_device(rows, self.device)
        self.live[index] = False
        self.block_table[index] = SCRATCH

    def park_all(self) -> None:
        self.live.fill_(False)
        self.block_table.fill_(SCRATCH)

    # -- decode ----------------------------------------------------------------------------------
    def _decode_step(self, rows: int, kv_len: int) -> None:
        """One token for each of the first `rows` rows; logits into `self.logits[:rows]`.

        The idle-row rule, here only: a decode step runs over the first `rows` rows, a rung of the batch
        ladder, and rows without a decoding request (free, or their prompt not yet prefilled) are
        computed and thrown away. Such a row writes position 0 of the scratch block and reads that one
        position (its block table is all scratch, `park`), and its position does not move."""
        live = self.live[:rows]
        position = torch.where(live, self.position[:rows], 0)  # (rows,)
        used = torch.where(live, position + 1, 1).int()
        table = self.block_table[:rows]  # (rows, W)
        cu_q = torch.arange(rows + 1, device=self.device, dtype=torch.int32)
        plan = Plan(table, write_positions(table, None, position, self.block_size), cu_q, used, max_q=1,
                    kv_len=kv_len, flash=self.flash, triton_decode=self.triton_decode)
        embeds = self.llm.get_input_embeddings()(self.sampler.last_token[:rows, None])  # (rows, 1, D)
        hidden = self._decoder(embeds, position[:, None], plan)
        self.logits[:rows] = self.llm.lm_head(hidden[:, 0])
        self.position[:rows] += live.long()

    def bucket(self, rows: int, kv_needed: int) -> tuple[int, int]:
        """The smallest (rows, kv_len) rungs that hold `rows` slots and `kv_needed` positions."""
        return (next(b for b in self.batch_ladder if b >= rows), next(k for k in self.kv_ladder if k >= kv_needed))

    @torch.inference_mode()
    def decode(self, rows: int, kv_needed: int, greedy: bool, penalty: bool, min_tokens: bool,
               candidates: int | None = None) -> torch.Tensor:
        """Sampled tokens (rows',) of the first rows' ≥ `rows` rows (rows' a rung of the ladder)."""
        rows, kv_len = self.bucket(rows, kv_needed)
        graph = self.graphs.get((rows, kv_len))
        if graph is not None:
            graph.replay()
        else:
            self._step(rows, kv_len)  # this step, run for real: also the warm-up a recording needs
            if self.use_graphs:
                self._record(rows, kv_len)
        slots = torch.arange(rows, device=self.device)
        return self.sampler.sample(self.logits[:rows], slots, greedy=greedy, penalty=penalty, min_tokens=min_tokens,
                                   candidates=candidates)

    def _record(self, rows: int, kv_len: int) -> None:
        """Record the step of this rung pair (after it ran for real)."""
        self.graphs[(rows, kv_len)] = self._capture(lambda: self._step(rows, kv_len))[0]

    def _capture(self, run):
        """`run()` recorded as a CUDA graph in the runner's one pool: (graph, its output). Recording runs
        nothing, so the cache and positions stay as the real run before it left them. Only the engine's
        thread touches the GPU while it records."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = run()
        self._pool = graph.pool()
        return graph, out

    @torch.inference_mode()
    def warm_up(self, say=None) -> None:
        """Compile (with `compile`) and record (with graphs) now what requests would otherwise wait for:
        the image path for one image and for several (torch.compile specializes a size of 1), the prefill, and every
        rung pair of the decode step, largest first (the pool then fits the largest at once). This
        writes into the scratch block and rows' state: only before any request runs; every row
        is idle again after. `say(text)` hears of each phase as it starts."""
        say = say or (lambda text: None)
        if self.compiled:
            say("compiling the image path and the prefill (a minute or more)")
            size, pad = self.model.config.vision_config.image_size, self.model.config.image_token_id
            for n in (1, 2):  # one image and several
                self.embed([[pad] * (n * self.model.num_image_tokens)], torch.zeros(n, 3, size, size))
            width = self.llm.get_input_embeddings().embedding_dim
            prompt = torch.zeros(100, width, dtype=self.dtype, device=self.device)  # keys: 128, not 100
            self.prefill([Chunk(0, 0, prompt, True, blocks=[])], greedy=True, penalty=False, min_tokens=False)  # 2 rows: see __init__
        if self.use_graphs:
            say(f"recording {len(self.image_rungs)} graphs of the image path and {len(self.prefill_buckets)} of one prompt's prefill")
            size = self.model.config.vision_config.image_size
            for rung in self.image_rungs:
                self._encode(torch.zeros(rung, 3, size, size, device=self.device))
            width = self.llm.get_input_embeddings().embedding_dim
            for bucket in self.prefill_buckets:
                prompt = torch.zeros(bucket - 1, width, dtype=self.dtype, device=self.device)
                self.prefill([Chunk(0, 0, prompt, True, blocks=[])], greedy=True, penalty=False, min_tokens=False)
        if self.use_graphs or self.compiled:
            pairs = [(r, k) for r in reversed(self.batch_ladder) for k in reversed(self.kv_ladder) if (r, k) not in self.graphs]
            say(("compiling the decode step (minutes), then " if self.compiled else "")
                + (f"recording {len(pairs)} decode graphs" if self.use_graphs else "running each batch and length rung"))
            for rows, kv_len in pairs:
                self._step(rows, kv_len)  # warm up (and compile) this shape outside the graph
                if self.use_graphs:
                    self._record(rows, kv_len)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.park_all()
