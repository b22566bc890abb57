"""What evaluators ask of a model: batched greedy answers to one-image prompts, and the
log-likelihood of candidate replies. Prompts are rendered with the run's chat template."""

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
from lvlm_jax.generate import generate_tokens, left_pad
from lvlm_jax.train.stages.base import normalize_pixels

# Prompt lengths are rounded up to a multiple of this (and batches padded to a fixed size), so an
# eval set compiles the decode a handful of times rather than once per length.
LENGTH_BUCKET = 16


def _bucket(n: int, cap: int) -> int:
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, cap)


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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*end_of_turn_ids(self.template, self.tokenizer),
                                    self.tokenizer.eos_id]))

    def _pixels(self, images: Sequence[Any]) -> np.ndarray:
        prepared = np.stack([prepare_image(im, self.image_size, self.image_mode)
                             for im in images])[:, None]
        return np.asarray(normalize_pixels(prepared, self.image_mean, self.image_std))

    def _render(self, prompt: str, reply: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        conv = [{"from": "human", "value": f"{IMAGE_MARK}\n{prompt}"}]
        if reply is not None:
            conv.append({"from": "gpt", "value": reply})
        return render(self.template, conv, self.tokenizer, max(self.model.cfg.image_tokens, 1),
                      add_generation_prompt=reply is None)

    def generate(self, images: Sequence[Any], prompts: Sequence[str],
                 max_new_tokens: int = 16) -> list[str]:
        """Greedy (or, with `temperature`, sampled) answers, one per (image, prompt), decoded in
        left-padded batches."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not prompts:
            return []
        context = self.model.cfg.language.max_length
        rows = [self._render(p)[0].tolist() for p in prompts]
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > context:
            raise ValueError(f"an eval prompt of {longest} tokens plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's context of {context}")
        length = _bucket(longest, context - max_new_tokens)
        size = min(self.batch_size, len(rows))
        stop, drop = self.stop_ids, {*self.stop_ids, self.tokenizer.image_id,
                                     self.tokenizer.pad_id}
        answers: list[str] = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            ims = list(images[start:start + size])
            n = len(chunk)
            chunk += [chunk[0]] * (size - n)  # one batch shape: one compilation
            ims += [ims[0]] * (size - n)
            ids, seg = left_pad(chunk, pad_id=self.tokenizer.pad_id, length=length)
            rng = jax.random.fold_in(jax.random.PRNGKey(self.sample_seed), start // size)
            out = generate_tokens(self.model, self.params, ids, seg, self._pixels(ims), rng,
                                  max_new_tokens=max_new_tokens, temperature=self.temperature,
                                  stop_ids=stop, pad_id=self.tokenizer.pad_id,
                                  prefix_lm=self.model.cfg.prefix_lm)
            tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
            for row, k in zip(tokens[:n], lengths[:n], strict=True):
                kept = [int(t) for t in row[:int(k)] if int(t) not in drop]
                answers.append(self.tokenizer.decode(kept).strip())
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
        size = min(self.batch_size, len(flat))
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
            total, weight = _reply_logprobs(self.model, self.params, ids, seg,
                                            self._pixels([images[i] for i in idx]), mask,
                                            self.model.cfg.prefix_lm)
            sums += np.asarray(total)[:n].tolist()
            counts += np.asarray(weight)[:n].astype(int).tolist()
        out: list[tuple[list[float], list[int]]] = [([], []) for _ in options]
        for (i, _), s, c in zip(flat, sums, counts, strict=True):
            out[i][0].append(float(s))
            out[i][1].append(int(c))
        return out
