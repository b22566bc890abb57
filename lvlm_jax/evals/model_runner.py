"""What evaluators ask of a model: batched greedy answers to one-image prompts, and the
log-likelihood of candidate replies. Prompts are rendered with the run's chat template; batches
are sharded over the mesh's batch axes when the runner has a mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.templates import IMAGE_MARK, end_of_turn_ids, render
from lvlm_jax import progress as progress_lib
from lvlm_jax import sharding
from lvlm_jax.generate import generate_tokens, left_pad, params_platform
from lvlm_jax.models.vlm import with_unscanned_decoder

# Prompt lengths are rounded up to one of a few sizes (16, 32, 48, 64, then x1.5 steps), and
# batches padded to a fixed size, so an eval set compiles the decode a handful of times rather
# than once per length.
LENGTH_BUCKET = 16
# What a missing, truncated or non-image file raises when decoded.
UNREADABLE = (OSError, ValueError, SyntaxError)


def _to_host(x: Any) -> np.ndarray:
    """A result of a sharded batch as a numpy array, whole on every process: rows computed on
    other hosts' devices are gathered (every process reads every answer, as it holds every
    record)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _bucket(n: int, cap: int) -> int:
    size = LENGTH_BUCKET
    while size < n:
        size = size + LENGTH_BUCKET if size < 4 * LENGTH_BUCKET else size * 3 // 2
    return min(size, cap)


@functools.partial(jax.jit, static_argnames=("model", "prefix_lm"))
def _reply_logprobs(model: Any, params: Any, ids, seg, pixels, reply_mask, prefix_lm: bool):
    """Sum of log p(token) over each row's reply tokens (reply_mask), and their count."""
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    prefix = ((seg > 0) & (jnp.cumsum(reply_mask, axis=1) == 0)) if prefix_lm else None
    logits = model.apply({"params": params}, ids, pixels, segment_ids=seg, positions=positions,
                         prefix_mask=prefix)[0]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = reply_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_logp * weight, axis=1), jnp.sum(weight, axis=1)


@dataclasses.dataclass
class ModelRunner:
    """A model, its params, and how its training run rendered prompts and images."""

    model: Any
    params: Any
    tokenizer: Any
    template: str
    image_size: int
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_mode: str = "pad"
    batch_size: int = 32
    # 0: greedy. Above 0, answers are sampled with keys that depend only on (sample_seed,
    # batch index), so two params answer the same prompts with the same random numbers.
    temperature: float = 0.0
    sample_seed: int = 0
    # A mesh shards each batch over its batch axes (data, fsdp); None: inputs stay host arrays.
    mesh: Any = None
    show_progress: bool = False  # a progress bar (or a line every 10% in a log) per call
    # Decode with the decoder's layers unrolled (models.vlm.with_unscanned_decoder); None: where
    # the params live on CPU devices, where it decodes ~1.3x faster (eval_throughput.txt).
    unscan_decoder: bool | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*end_of_turn_ids(self.template, self.tokenizer),
                                    self.tokenizer.eos_id]))

    def _normalize(self, prepared: np.ndarray) -> np.ndarray:
        # On the host, in numpy: jnp would compile each elementwise op for each batch shape.
        # The same float32 operations as normalize_pixels, so the same values.
        x = prepared.astype(np.float32) / np.float32(255.0)
        return (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std,
                                                                           np.float32)

    def _local_rows(self, size: int) -> set[int]:
        """The rows of a batch of `size` that this process's devices hold: the only images it
        decodes. On several hosts each decodes its share; the other rows stay zeros, which
        `_put` never reads."""
        if self.mesh is None or jax.process_count() == 1:
            return set(range(size))
        rows: set[int] = set()
        placed = sharding.batch_sharding(self.mesh, 1).addressable_devices_indices_map((size,))
        for (index,) in placed.values():
            rows.update(range(*index.indices(size)))
        return rows

    def _pixels(self, images: Sequence[Any], skip_unreadable: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
        """(normalized pixels [n, 1, h, w, 3], readable [n]) of this process's rows. With
        `skip_unreadable`, an image that cannot be decoded becomes a black one, flagged False."""
        cfg = self.model.cfg
        if cfg.image_grid_pinpoints or cfg.image_newline:
            # One resized view would feed the model another layout than it was trained on.
            raise ValueError("the generation-based evaluators do not tile images any-res yet "
                             "(model.image_grid_pinpoints / image_newline); eval_loss, `lvlm "
                             "generate` and VLMHandle.generate_ids do")
        blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        prepared, ok = [blank] * len(images), np.ones(len(images), bool)
        for r in self._local_rows(len(images)):
            try:
                prepared[r] = prepare_image(images[r], self.image_size, self.image_mode)
            except UNREADABLE:
                if not skip_unreadable:
                    raise
                ok[r] = False
        return self._normalize(np.stack(prepared)[:, None]), ok

    def _batch_size(self, n: int) -> int:
        """The fixed batch size of a call with n rows: a multiple of the mesh's batch shards."""
        size = min(self.batch_size, n)
        if self.mesh is not None:
            shards = sharding.batch_axis_size(self.mesh)
            size = -(-size // shards) * shards
        return size

    def _put(self, x: np.ndarray) -> Any:
        """A batch array as a global array sharded over the batch axes (every process holds
        the whole batch, so each device's slice is read from it)."""
        if self.mesh is None:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh, x.ndim),
                                            lambda index: x[index])

    def _render(self, prompt: str, reply: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        conv = [{"from": "human", "value": f"{IMAGE_MARK}\n{prompt}"}]
        if reply is not None:
            conv.append({"from": "gpt", "value": reply})
        return render(self.template, conv, self.tokenizer, max(self.model.cfg.image_tokens, 1),
                      add_generation_prompt=reply is None)

    def generate(self, images: Sequence[Any], prompts: Sequence[str],
                 max_new_tokens: int = 16, skip_unreadable: bool = False,
                 desc: str = "") -> list[str | None]:
        """Greedy (or, with `temperature`, sampled) answers, one per (image, prompt), decoded in
        left-padded batches of similar prompt lengths. With `skip_unreadable`, a prompt whose
        image cannot be decoded gets None instead of raising."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not prompts:
            return []
        context = self.model.cfg.language.max_length
        rendered: dict[str, list[int]] = {}  # benchmarks repeat questions ("what color is...")
        rows = [rendered.get(p) or rendered.setdefault(p, self._render(p)[0].tolist())
                for p in prompts]
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > context:
            raise ValueError(f"an eval prompt of {longest} tokens plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's context of {context}")
        # Batches of similar lengths pad little; the order depends on the prompts only, so two
        # params answer the same batches (and, sampling, with the same random numbers).
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        size = self._batch_size(len(rows))
        stop, drop = self.stop_ids, {*self.stop_ids, self.tokenizer.image_id,
                                     self.tokenizer.pad_id}
        answers: list[str | None] = [None] * len(rows)
        bar = progress_lib.progress(len(rows), desc=desc, unit="examples") \
            if self.show_progress else None

        def collect(out: dict, picked: list[int], n: int, ok: Any) -> None:
            tokens, lengths = _to_host(out["tokens"]), _to_host(out["lengths"])
            ok = _to_host(ok)  # each process knows only whether its own rows' images decoded
            for r in range(n):
                if ok[r]:
                    kept = [int(t) for t in tokens[r, :int(lengths[r])] if int(t) not in drop]
                    answers[picked[r]] = self.tokenizer.decode(kept).strip()
            if bar is not None:
                bar.update(n)

        unscan = self.unscan_decoder
        if unscan is None:
            unscan = params_platform(self.params) == "cpu"
        model, params = (with_unscanned_decoder(self.model, self.params) if unscan
                         else (self.model, self.params))
        key = jax.random.PRNGKey(self.sample_seed)
        pending: list[tuple] = []
        for k, start in enumerate(range(0, len(rows), size)):
            picked = order[start:start + size]
            n = len(picked)
            picked += [picked[0]] * (size - n)  # one batch shape per length bucket
            chunk = [rows[i] for i in picked]
            length = _bucket(max(len(r) for r in chunk), context - max_new_tokens)
            ids, seg = left_pad(chunk, pad_id=self.tokenizer.pad_id, length=length)
            pixels, ok = self._pixels([images[i] for i in picked], skip_unreadable)
            # Greedy decoding draws no random numbers: no per-batch key to make on the device.
            rng = key if self.temperature == 0 else jax.random.fold_in(key, k)
            out = generate_tokens(model, params, self._put(ids), self._put(seg),
                                  self._put(pixels), rng, max_new_tokens=max_new_tokens,
                                  temperature=self.temperature, stop_ids=stop,
                                  pad_id=self.tokenizer.pad_id,
                                  prefix_lm=model.cfg.prefix_lm)
            # The device runs this batch (dispatch is asynchronous) while the host reads the
            # previous one's answers and, next turn, prepares the following batch.
            if pending:
                collect(*pending.pop())
            pending.append((out, picked, n, self._put(ok)))
        for job in pending:
            collect(*job)
        if bar is not None:
            bar.close()
        return answers

    def reply_logprobs(self, images: Sequence[Any], prompts: Sequence[str],
                       options: Sequence[Sequence[str]]) -> list[tuple[list[float], list[int]]]:
        """For each prompt, the summed log-likelihood of each option as the whole reply (its
        end-of-turn tokens included) and the number of tokens scored."""
        flat = [(i, opt) for i, opts in enumerate(options) for opt in opts]
        if not flat:
            return []
        rendered = [self._render(prompts[i], opt) for i, opt in flat]
        context = self.model.cfg.language.max_length
        longest = max(len(ids) for ids, _ in rendered)
        if longest > context:
            raise ValueError(f"an eval prompt with its option has {longest} tokens, more than "
                             f"the model's context of {context}")
        length = _bucket(longest, context)
        size = self._batch_size(len(flat))
        sums: list[float] = []
        counts: list[int] = []
        for start in range(0, len(flat), size):
            part = rendered[start:start + size]
            idx = [i for i, _ in flat[start:start + size]]
            n = len(part)
            part += [part[0]] * (size - n)
            idx += [idx[0]] * (size - n)
            ids = np.full((size, length), self.tokenizer.pad_id, np.int32)
            seg = np.zeros((size, length), np.int32)
            mask = np.zeros((size, length), bool)
            for r, (row_ids, row_mask) in enumerate(part):  # right-padded: replies line up
                ids[r, :len(row_ids)], seg[r, :len(row_ids)] = row_ids, 1
                mask[r, :len(row_mask)] = row_mask
            pixels, _ = self._pixels([images[i] for i in idx])
            total, weight = _reply_logprobs(self.model, self.params, self._put(ids),
                                            self._put(seg), self._put(pixels),
                                            self._put(mask), self.model.cfg.prefix_lm)
            sums += _to_host(total)[:n].tolist()
            counts += _to_host(weight)[:n].astype(int).tolist()
        out: list[tuple[list[float], list[int]]] = [([], []) for _ in options]
        for (i, _), s, c in zip(flat, sums, counts, strict=True):
            out[i][0].append(float(s))
            out[i][1].append(int(c))
        return out
