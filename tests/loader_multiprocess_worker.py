"""One process of the loader multi-process test: joins a gloo cluster on localhost, builds the
training input exactly as `lvlm train` does, and prints the record numbers of one epoch of its
share (a JSON list on the last line)."""

import itertools
import json
import os
import sys

from xla_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=1)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    port, n, pid, data_dir, epoch = sys.argv[1:6]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid))
    sys.path.insert(0, os.path.dirname(__file__))
    from record_shards import caption_number
    from training_utils import tiny_config

    from lvlm_jax.train import input_pipeline

    cfg = tiny_config(batch=int(n), **{
        "model.language.vocab_size": 384, "model.image_token_id": -1, "data.kind": "caption",
        "data.source": "arrayrecord", "data.path": data_dir, "data.seq_len": 16})
    assert jax.process_count() == int(n) and jax.process_index() == int(pid)
    batches, _, size = input_pipeline.make_input(cfg)
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    seen = [caption_number(tokenizer, b) for b in itertools.islice(batches, int(epoch))]
    print(json.dumps({"size": size, "seen": seen}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
