"""Dependencies point one way: evaluators run without the trainer (evals/ imports nothing from
train/), so a researcher can score params of any origin."""

import ast
import os
import subprocess
import sys

from xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALS = os.path.join(ROOT, "lvlm_jax", "evals")


def _imported_modules(path: str) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_of_evals_imports_the_trainer():
    offenders = {}
    for folder, _, files in os.walk(EVALS):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                bad = sorted(m for m in _imported_modules(path)
                             if m == "lvlm_jax.train" or m.startswith("lvlm_jax.train."))
                if bad:
                    offenders[os.path.relpath(path, ROOT)] = bad
    assert not offenders, offenders


def test_an_evaluator_runs_on_random_params_without_loading_the_trainer():
    # Everything an evaluation needs, down to generating answers, with lvlm_jax.train never
    # imported (not even indirectly through a package __init__).
    code = """
import sys, jax
from lvlm_jax.evals import benchmarks, evaluators, metrics, model_runner, run, runners
from lvlm_jax.models import build_model, dummy_inputs, vlm_config
from data_pipelines.loader import demo_tokenizer
from data_pipelines.synthetic import SyntheticShapes
tok = demo_tokenizer(sys.argv[1])
cfg = vlm_config({"vision": {"preset": "tiny", "image_size": 32},
                  "language": {"preset": "tiny", "vocab_size": 384, "num_layers": 1},
                  "image_token_id": tok.image_id})
model = build_model(cfg)
params = jax.jit(lambda r: model.init(r, **dummy_inputs(cfg, batch=1))["params"])(
    jax.random.PRNGKey(0))
runner = model_runner.ModelRunner(model, params, tok, "vicuna_v1", image_size=32, batch_size=2)
shapes = SyntheticShapes(seed=0, image_size=32, split="eval")
records = [shapes.vqa(i) for i in range(3)]
summary, examples = evaluators.run_vqa(runner, records, 3)
assert len(examples) == 3 and 0.0 <= summary["vqa_accuracy"] <= 1.0, summary
loaded = sorted(m for m in sys.modules if m.startswith("lvlm_jax.train"))
assert not loaded, loaded
print("ok")
"""
    from lvlm_jax.train.input_pipeline import cache_dir  # this process may: the child may not

    out = subprocess.run([sys.executable, "-c", code, cache_dir()], cwd=ROOT, env=cpu_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
